"""Tandem Transformers core library, one folder per concern, each layer importing only the ones below it:

    training/   drafter training, evaluation, settings tuning
    decoding/   speculative rounds, the request loop, workers, the in-process engine, the model bundle, call costs
    model/      the primary and drafter on JAX, layers, KV caches, the router, the CPU kernels
    formats/    GGUF / safetensors, the tokenizer and chat template, stop strings, the model fetch
    config.py, errors.py   frozen configs and typed errors, used by every layer
    weights/    the shipped drafters and routers (data)

The library imports no gRPC, Ray, matplotlib, torch or llama.cpp (pyproject.toml's import-linter contracts check it),
and what the orchestrator imports from it (config, errors, formats.tokenizer, formats.text, decoding.rounds,
decoding.speculative) stays JAX-free. The services, the wire layer (`tandemrpc`) and the applications (`apps`,
`loadtest`) sit on top; nothing here imports them. The package `__init__` files hold docstrings only, so importing a
light module loads nothing heavy.
"""

import os

# XLA's CPU copy insertion copies a donated buffer updated in place (the KV cache) on every call unless it uses region
# analysis (docs/design.md, Measured facts about the CPU): measured here, a SmolLM2 decode step costs 63 ms without the
# flag and 26 ms with it at a 2,048-slot cache. XLA reads XLA_FLAGS once, when JAX initialises its CPU backend, so this
# runs before any model code.
_XLA_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
if _XLA_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAG}".strip()
