"""Decoding: speculative rounds between the primary and a drafter, the session-holding workers, the in-process engine
and the bundle that loads the shipped models into it.

    speculative.py  host-side math of one round: target distributions, verification, τ stopping (NumPy, no JAX)
    lookup.py       prompt-lookup drafts copied from the request's own tokens (NumPy, no JAX)
    rounds.py       the request loop over a PrimaryAPI and a DrafterAPI (no JAX: the orchestrator runs it too)
    workers.py      the Primary and Drafter workers: sessions, batching, what the two model services serve
    engine.py       the in-process engine: the request loop over workers called directly
    bundle.py       loads the SmolLM2 primary and the shipped drafters and routers into an engine
    costs.py        measured costs of single model calls (a primary block of k tokens, a drafter step)

May import: `tandem.model`, `tandem.formats`, `tandem.config`, `tandem.errors`. Not `tandem.training`. The modules
the orchestrator imports (speculative, rounds) import no JAX.
"""
