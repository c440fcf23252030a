"""The models on JAX: the primary (the large model, run in blocks), the drafter (the small model, Tandem or vanilla),
their layers, KV caches, the adaptive-γ router and the CPU int8 kernels.

    layers.py    attention, SwiGLU, RoPE, feature-major projections shared by both models
    primary.py   the primary: parameters from a state dict, `PrimaryRunner` (prefill / verify blocks on a KV cache)
    drafter.py   the drafter: parameters, training forward, `DrafterRunner` (drafting rounds on its own cache)
    kvcache.py   KV caches bucketed by length, and the primary's prefix cache
    router.py    the trained router MLP (training and serving sides)
    kernels/     the C++ int8 product and attention kernels (sources shipped; compiled on first use)

May import: `tandem.formats`, `tandem.config`, `tandem.errors`, JAX and flax. Not `tandem.decoding` or
`tandem.training`.
"""
