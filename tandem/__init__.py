"""Tandem Transformers core library: models, loaders, tokenizer, speculative math and the in-process engine.

No gRPC lives here. Importing the package sets one XLA flag before JAX is imported (DESIGN.md: without it XLA copies
the whole KV cache per layer on CPU); modules that do not need JAX (config, tokenizer, assets) stay JAX-free.
"""

import os

_COPY_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
if _COPY_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_COPY_FLAG}".strip()
