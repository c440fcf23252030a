"""The Orchestrator: the public gRPC API; runs SPEED rounds between the Primary service (the primary model) and the
Secondary service (the drafters).

    server.py      `python -m orchestrator`: flags, the tokenizer, the gRPC server
    servicer.py    GenerateRequest / GenerateResponse <-> the dataclasses of generation.py
    core.py        the Orchestrator: admission, pinning, speculation decisions, the request loop, failover, the log line
    generation.py  one request in flight: its parameters, chunks, the pods it is pinned to, the cancellable handle
    config.py      OrchestratorConfig
    admission.py   how many requests run and wait; the adaptive limit under a TPOT target
    load.py        load-aware speculation: drafts per round and steps per call at a load
    payoff.py      whether speculating has paid off here, per mode and settings
    routing.py     endpoint pools: which pods, health, session-affine leases
    clients.py     the model services behind the request loop's PrimaryAPI / DrafterAPI
    metrics.py     the Prometheus series

May import `tandemrpc` and the JAX-free parts of `tandem` (config, errors, formats.tokenizer, formats.text,
decoding.rounds, decoding.speculative); not the other services, not `apps`.
"""
