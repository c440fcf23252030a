"""Tandem Transformers core library: models, loaders, tokenizer, speculative math, the request loop and the
in-process engine.

The library modules import no gRPC and modules that do not need JAX (config, tokenizer, assets, rounds, text) stay
JAX-free. The command line (`tandem.cli`, `tandem.serve`) sits on top of everything, gRPC included, and nothing in the
library imports it.
"""
