"""Tandem Transformers core library: models, loaders, tokenizer, speculative math, the request loop and the
in-process engine.

The library modules import no gRPC and modules that do not need JAX (config, tokenizer, assets, rounds, text) stay
JAX-free. The command line (`tandem.cli`, `tandem.serve`) sits on top of everything, gRPC included, and nothing in the
library imports it.
"""

import os

# XLA's CPU copy insertion copies a donated buffer updated in place (the KV cache) on every call unless it uses region
# analysis (DESIGN.md): measured here, a SmolLM2 decode step costs 63 ms without the flag and 26 ms with it at a
# 2,048-slot cache. XLA reads XLA_FLAGS once, when JAX initialises its CPU backend, so this runs before any model code.
_XLA_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
if _XLA_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAG}".strip()
