"""Tandem Transformers core library: models, loaders, tokenizer, speculative math and the in-process engine.

No gRPC lives here; modules that do not need JAX (config, tokenizer, assets) stay JAX-free.
"""
