"""The Llama decoder block shared by the primary and the drafter.

Axis names used in every einsum and shape comment of the model files:
    B batch, T new tokens in this call, N = B*T tokens (b-major), S attended context slots, L layers, D model width,
    K key/value heads, G query heads per key/value head, H head dim, F SwiGLU width, V vocabulary.

Layout (docs/design.md, Measured facts about the CPU): activations are feature-major, `x [D, N]`, and weights are
`[out, in]`, so every projection is one `W @ x` matrix product whose cost barely grows from 1 to 8 tokens; the
row-major `x @ W` layout costs ~2x more at 4-8 tokens. The query/key/value and the gate/up projections are fused into
one product each. Layers are a tuple run by an unrolled Python loop: scanning over stacked weights slices every layer's
weights out of the stack on each call, which XLA on CPU pays as a copy.

Attention always has two parts: a *context* (keys/values already computed: the KV cache for inference, the primary's
projected states for drafter training) and the *block* (keys/values of the T tokens of this call). A softmax over both
parts at once is the same as one softmax over their concatenation, but nothing is concatenated and the cache is
written only after the whole stack has run.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tandem.model import kernels
from tandem.model.kernels import QLinear

# Finite stand-in for -inf: a fully masked row then yields zeros instead of NaNs.
_MASKED = -1e30


Weight = jax.Array | QLinear  # [out, in], applied as `W @ x`


@struct.dataclass
class LayerParams:
    """One decoder layer's weights, `[out, in]`.

    Query row n * H + h is head n's component h, and query head n belongs to key/value head n // G (Hugging Face
    `repeat_kv` order), so the fused rows are Hugging Face's q_proj, k_proj and v_proj stacked. A weight is a float
    array or, in a primary loaded from a quantized GGUF, a `QLinear` (the same float array plus integer panels for the
    CPU kernel); both are applied as `W @ x`.
    """

    attn_norm: jax.Array  # [D]
    wqkv: Weight  # [(K*G + 2K) * H, D]: query heads, then key heads, then value heads
    wo: Weight  # [D, K*G*H]
    mlp_norm: jax.Array  # [D]
    w_gate_up: Weight  # [2F, D]: gate rows, then up rows
    w_down: Weight  # [D, F]
    n_kv_heads: int = struct.field(pytree_node=False)  # K
    head_dim: int = struct.field(pytree_node=False)  # H

    @property
    def group_size(self) -> int:
        """G, query heads per key/value head."""
        return self.wqkv.shape[0] // (self.n_kv_heads * self.head_dim) - 2


Layers = tuple[LayerParams, ...]


def fuse_layer(
    attn_norm: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    mlp_norm: np.ndarray,
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    *,
    n_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
) -> LayerParams:
    """A layer from Hugging Face-layout matrices: q [K*G*H, D], k and v [K*H, D], o [D, K*G*H], gate and up [F, D],
    down [D, F], norms [D]."""

    def arr(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, dtype=dtype)

    return LayerParams(
        attn_norm=arr(attn_norm),
        wqkv=arr(np.concatenate([q, k, v], axis=0)),
        wo=arr(o),
        mlp_norm=arr(mlp_norm),
        w_gate_up=arr(np.concatenate([gate, up], axis=0)),
        w_down=arr(down),
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, fixed_order: bool = False) -> jax.Array:
    """RMSNorm over the leading (feature) axis. x: [D, ...], weight: [D]. With fixed_order (x [D, N]), each column's
    sum of squares runs in input order whatever N is (`tandem.model.kernels.rms_norm`)."""
    if fixed_order:
        return kernels.rms_norm(x, weight, eps)
    var = jnp.mean(jnp.square(x), axis=0, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * weight.reshape(weight.shape + (1,) * (x.ndim - 1))


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, fixed_order: bool = False
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for rotate-half RoPE.

    Args:
        positions: [B, T] integer positions.
        head_dim: H (even).
        theta: base frequency.
        fixed_order: each position's tables the same in any call (`tandem.model.kernels.rope_tables`).

    Returns:
        (cos, sin), each [H, N]: the H/2 frequencies repeated over both halves of a head, one column per token.
    """
    if fixed_order:
        return kernels.rope_tables(positions, head_dim, theta)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = inv_freq[:, None] * positions.reshape(1, -1).astype(jnp.float32)  # [H/2, N]
    angles = jnp.concatenate([angles, angles], axis=0)  # [H, N]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, fixed_order: bool = False) -> jax.Array:
    """Rotates pairs (i, i + H/2) of every head. x: [..., H, N]; cos, sin: [H, N]. With fixed_order, each output from
    its own inputs in one fixed order (`tandem.model.kernels.rope`)."""
    if fixed_order:
        return kernels.rope(x, cos, sin)
    half = x.shape[-2] // 2
    rotated = jnp.concatenate([-x[..., half:, :], x[..., :half, :]], axis=-2)  # rotate_half
    return x * cos + rotated * sin


def qkv_projection(
    p: LayerParams, x_normed: jax.Array, cos: jax.Array, sin: jax.Array, fixed_order: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries and keys (RoPE applied) and values of one layer in one product.

    Args:
        p: the layer.
        x_normed: [D, N] after the attention norm.
        cos, sin: [H, N].
        fixed_order: RoPE in the CPU kernel (`apply_rope`).

    Returns:
        q [K, G, H, N], k [K, H, N], v [K, H, N].
    """
    k_heads, h, g = p.n_kv_heads, p.head_dim, p.group_size
    n = x_normed.shape[1]
    qkv = p.wqkv @ x_normed  # [(K*G + 2K) * H, N]
    q = qkv[: k_heads * g * h].reshape(k_heads, g, h, n)
    k = qkv[k_heads * g * h : k_heads * (g + 1) * h].reshape(k_heads, h, n)
    v = qkv[k_heads * (g + 1) * h :].reshape(k_heads, h, n)
    return apply_rope(q, cos, sin, fixed_order), apply_rope(k, cos, sin, fixed_order), v


Context = tuple[jax.Array, ...]  # the context in segments along S (one for training; the cache's buffers in serving)


def two_part_attention(
    q: jax.Array,
    ctx_k: Context,
    ctx_v: Context,
    ctx_mask: Context,
    blk_k: jax.Array,
    blk_v: jax.Array,
    blk_mask: jax.Array,
) -> jax.Array:
    """Grouped-query attention over a context part and a block part with one joint softmax.

    The context may come in segments along S (the KV cache keeps one buffer per attended-length bucket, so a call
    reads whole buffers); a softmax over all segments and the block at once is the same as over their concatenation.

    Args:
        q: [K, G, H, B, T] queries (RoPE applied).
        ctx_k, ctx_v: segments [B, K, S_j, H] of the context keys/values (S_j may be 0).
        ctx_mask: segments [B, T, S_j], True where query t may read context slot s.
        blk_k, blk_v: [K, H, B, T] the block's own keys/values.
        blk_mask: [B, T, T] True where query t may read block token u.

    Returns:
        [K, G, H, B, T] attention output.
    """
    scale = q.shape[2] ** -0.5
    # The context products take the queries batch-major ([B, K, G, T, H], a small copy): with the batch axes leading
    # in every operand XLA on CPU runs them as batched matrix products, while the feature-major query made it fuse the
    # masking and exponentials into a loop over the context that cost ~4x more at B = 16 over 256 slots.
    q_b = jnp.transpose(q, (3, 0, 1, 4, 2))  # [B, K, G, T, H]
    s_ctx = [
        jnp.where(mask[:, None, None], jnp.einsum("BKGTH,BKSH->BKGTS", q_b, k) * scale, _MASKED)
        for k, mask in zip(ctx_k, ctx_mask, strict=True)
    ]
    s_blk = jnp.einsum("KGHBT,KHBU->BKGTU", q, blk_k) * scale
    s_blk = jnp.where(blk_mask[:, None, None], s_blk, _MASKED)
    m = functools.reduce(
        jnp.maximum,
        [jnp.max(s, axis=-1, initial=_MASKED, keepdims=True) for s in s_ctx],
        jnp.max(s_blk, axis=-1, keepdims=True),
    )  # [B, K, G, T, 1]
    p_ctx = [jnp.where(mask[:, None, None], jnp.exp(s - m), 0.0) for s, mask in zip(s_ctx, ctx_mask, strict=True)]
    p_blk = jnp.where(blk_mask[:, None, None], jnp.exp(s_blk - m), 0.0)
    denom = sum((jnp.sum(p, axis=-1) for p in p_ctx), jnp.sum(p_blk, axis=-1))  # [B, K, G, T]
    o_ctx = sum(jnp.einsum("BKGTS,BKSH->BKGTH", p, v) for p, v in zip(p_ctx, ctx_v, strict=True))  # [B, K, G, T, H]
    out = jnp.einsum("BKGTU,KHBU->KGHBT", p_blk, blk_v)
    if p_ctx:
        out = out + jnp.transpose(o_ctx, (1, 2, 4, 0, 3))  # [K, G, H, B, T]
    return out / jnp.maximum(jnp.transpose(denom, (1, 2, 0, 3))[:, :, None], 1e-30)


def decoder_layer(
    p: LayerParams,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    ctx_k: Context,
    ctx_v: Context,
    ctx_mask: Context,
    blk_mask: jax.Array,
    eps: float,
    lengths: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> tuple[jax.Array, Any, Any]:
    """One pre-norm Llama block (attention + SwiGLU MLP).

    Args:
        p: the layer.
        x: [D, N] residual stream of the block's tokens.
        cos, sin: [H, N] RoPE tables for the block's positions.
        ctx_k, ctx_v: segments [B, K, S_j, H] of the context keys/values.
        ctx_mask: segments [B, T, S_j].
        blk_mask: [B, T, T].
        eps: RMSNorm epsilon.
        lengths: [B] cached positions per row, given to run attention and norms in one fixed order per token in the
            CPU kernels (`kernels.attention_write`, `kernels.rms_norm`; the masks are then implied: each row reads its
            first lengths[b] context positions and the block causally), the kernel writing the block's keys and
            values into the pool's segments.
        rows: with lengths, [B] each row's slot in the context segments, a pool's [R, K, S_j, H], read in place.

    Returns:
        (x_out [D, N], k [B, K, T, H], v [B, K, T, H]): the new residual stream and the block's own keys/values,
        which the caller may write to a cache; with lengths, (x_out, ctx_k, ctx_v) with the block written instead.
    """
    batch, t = blk_mask.shape[:2]
    fixed = lengths is not None
    q, k, v = qkv_projection(p, rms_norm(x, p.attn_norm, eps, fixed), cos, sin, fixed)
    k_heads, g, h, n = q.shape
    q = q.reshape(k_heads, g, h, batch, t)
    k, v = k.reshape(k_heads, h, batch, t), v.reshape(k_heads, h, batch, t)
    k_rows, v_rows = jnp.transpose(k, (2, 0, 3, 1)), jnp.transpose(v, (2, 0, 3, 1))  # [B, K, T, H]
    keys: Any = k_rows
    values: Any = v_rows
    if lengths is not None:
        assert rows is not None, "the fixed-order kernel writes the block into each row's slot of the pool"
        attn, keys, values = kernels.attention_write(q, k_rows, v_rows, lengths, rows, ctx_k, ctx_v)
    else:
        attn = two_part_attention(q, ctx_k, ctx_v, ctx_mask, k, v, blk_mask)
    x = x + p.wo @ attn.reshape(k_heads * g * h, n)
    gate_up = p.w_gate_up @ rms_norm(x, p.mlp_norm, eps, fixed)  # [2F, N]
    f = gate_up.shape[0] // 2
    x = x + p.w_down @ (jax.nn.silu(gate_up[:f]) * gate_up[f:])
    return x, keys, values


def decoder_stack(
    layers: Layers,
    x: jax.Array,
    positions: jax.Array,
    ctx_k: jax.Array | Sequence[Context],
    ctx_v: jax.Array | Sequence[Context],
    ctx_mask: jax.Array | Context,
    blk_mask: jax.Array,
    *,
    rope_theta: float,
    eps: float,
    taps: Sequence[int] = (),
    lengths: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, Any, Any]:
    """Runs all layers (unrolled).

    Args:
        layers: one LayerParams per layer.
        x: [D, N] embeddings of the block's tokens.
        positions: [B, T] absolute positions.
        ctx_k, ctx_v: [L, B, K, S, H] per-layer context keys/values (an array, or per layer its segments
            [B, K, S_j, H]).
        ctx_mask: [B, T, S], or its segments [B, T, S_j]; blk_mask: [B, T, T].
        rope_theta: RoPE base.
        eps: RMSNorm epsilon.
        taps: 1-indexed layers whose output residual stream is returned.
        lengths: [B] cached positions per row: attention and norms in one fixed order per token, each layer's kernel
            writing the block into its segments (`decoder_layer`).
        rows: with lengths, [B] each row's slot in context segments that are a whole pool's (`decoder_layer`).

    Returns:
        (x_out [D, N] before the final norm, tapped [n_taps, D, N] residual streams after the tapped layers,
        new_k [L, B, K, T, H], new_v [L, B, K, T, H]); with lengths, the written segments (`KVBuffers`) instead of
        new_k and new_v.
    """
    cos, sin = rope_tables(positions, layers[0].head_dim, rope_theta, lengths is not None)
    masks = _segments(ctx_mask)
    new_k, new_v, hidden = [], [], []
    for i, p in enumerate(layers):
        ctx = _segments(ctx_k[i]), _segments(ctx_v[i])
        x, k, v = decoder_layer(p, x, cos, sin, *ctx, masks, blk_mask, eps, lengths, rows)
        new_k.append(k)
        new_v.append(v)
        hidden.append(x)
    tapped = jnp.stack([hidden[t - 1] for t in taps]) if taps else jnp.zeros((0, *x.shape), x.dtype)
    if lengths is not None:
        return x, tapped, tuple(new_k), tuple(new_v)
    return x, tapped, jnp.stack(new_k), jnp.stack(new_v)


def _segments(context: jax.Array | Context) -> Context:
    """A context given whole as its one segment."""
    return context if isinstance(context, tuple) else (context,)


def causal_block_mask(batch: int, t: int) -> jax.Array:
    """[B, T, T] lower-triangular mask: token t reads block tokens u <= t."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=bool)), (batch, t, t))


def cache_mask(lengths: jax.Array, t: int, size: int, start: int = 0) -> jax.Array:
    """[B, T, size] mask reading cache positions start + s < lengths[b] (the same for every query of the block)."""
    readable = (start + jnp.arange(size))[None, :] < lengths[:, None]  # [B, size]
    return jnp.broadcast_to(readable[:, None, :], (lengths.shape[0], t, size))


# The KV cache pool: per layer, its buffers [R, K, S_j, H] over all R slots, one per segment of positions (segment j
# holds positions start_j .. start_j + S_j - 1; see `tandem.model.kvcache.KVCache`).
KVBuffers = tuple[tuple[jax.Array, ...], ...]


def segment_starts(layer: Sequence[jax.Array]) -> list[int]:
    """The first position of each segment of a layer's buffers [R, K, S_j, H], plus the end of the last."""
    starts = [0]
    for buffer in layer:
        starts.append(starts[-1] + buffer.shape[2])
    return starts


def write_cache(
    cache: KVBuffers, new: jax.Array, rows: jax.Array, lengths: jax.Array, reach: int | None = None
) -> KVBuffers:
    """Writes each selected row's block at its own offset, in every layer, into the segments its positions fall in.

    Args:
        cache: per layer, its segments [R, K, S_j, H].
        new: [L, B, K, T, H] the block's keys or values.
        rows: [B] slot of each block row.
        lengths: [B] first position to write per row; positions past the last segment are dropped.
        reach: static bound on the positions kept (any others are dropped): segments from there on are not written,
            which spares compiled calls their scatters (a SmolLM2 prefill of 64 tokens over 64 positions compiled in
            7.5 s instead of 9.5).

    Returns:
        The updated buffers (in place when the caller donates them).
    """
    positions = lengths[:, None] + jnp.arange(new.shape[3])[None, :]  # [B, T]
    # Advanced indices split by a slice put their broadcast shape [B, T] first: each update is [B, T, K, H].
    update = jnp.transpose(new, (0, 1, 3, 2, 4)).astype(cache[0][0].dtype)  # [L, B, T, K, H]
    starts = segment_starts(cache[0])
    at = []  # [B, T] per segment written: the position within it, or its size (out of bounds: dropped)
    for start, end in itertools.pairwise(starts):
        if reach is not None and start >= reach:
            break
        inside = (positions >= start) & (positions < end)
        at.append(jnp.where(inside, positions - start, end - start))
    return tuple(
        tuple(c.at[rows[:, None], :, p].set(u, mode="drop") for c, p in zip(layer, at, strict=False)) + layer[len(at) :]
        for layer, u in zip(cache, update, strict=True)
    )


def cached_decoder_stack(
    layers: Layers,
    x: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: KVBuffers,
    cache_v: KVBuffers,
    *,
    attend_len: int,
    whole_pool: bool = False,
    rope_theta: float,
    eps: float,
    taps: Sequence[int] = (),
    fixed_order: bool = False,
) -> tuple[jax.Array, jax.Array, KVBuffers, KVBuffers]:
    """Runs the stack over a block that follows each row's cached prefix, then writes the block into the cache.

    Args:
        layers: one LayerParams per layer.
        x: [D, N] embeddings of the block, row b's tokens at positions lengths[b] .. lengths[b] + T - 1.
        rows: [B] cache slot of each block row (a subset of the pool, in any order; with whole_pool, every slot in
            order).
        lengths: [B] cached positions of each row.
        cache_k, cache_v: per layer, its segments [R, K, S_j, H], the whole pool (donated by callers).
        attend_len: static number of attended positions: the end of a segment (>= max(lengths)); with fixed_order,
            the end of the last segment (the kernel reads each row's own length of every segment).
        whole_pool: static; the block is the whole pool by slot (B = R), and attention reads the segments in place
            instead of gathering the rows out of them (see `tandem.model.kvcache.KVCache`); with fixed_order the kernel
            reads every row's slot in place anyway.
        rope_theta: RoPE base.
        eps: RMSNorm epsilon.
        taps: 1-indexed layers whose output residual stream is returned.
        fixed_order: static; attention and norms in one fixed order per token (the CPU kernels), so that a token's
            outputs are bitwise the same in any block and batch; the attention kernel also writes the block into the
            cache, so one compiled call serves every attended length.

    Returns:
        (x_out [D, N], tapped [n_taps, D, N], cache_k, cache_v with the block written at lengths).
    """
    batch = rows.shape[0]
    t = x.shape[1] // batch
    positions = lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    starts = segment_starts(cache_k[0])
    if attend_len not in starts or (fixed_order and attend_len != starts[-1]):
        ends = starts[-1:] if fixed_order else starts[1:]
        raise ValueError(f"attend_len {attend_len} must end a cache segment, one of {ends}")
    n = starts.index(attend_len)  # the segments attended

    def context(cache: KVBuffers) -> tuple[tuple[jax.Array, ...], ...]:
        if whole_pool or fixed_order:  # the fixed-order kernel reads each row's slot in place
            return tuple(layer[:n] for layer in cache)
        # Per layer and segment [B, K, S_j, H]: each row's part of a segment is contiguous, so the gather copies
        # whole blocks (and only the segments attended).
        return tuple(tuple(c[rows] for c in layer[:n]) for layer in cache)

    x, tapped, new_k, new_v = decoder_stack(
        layers,
        x,
        positions,
        context(cache_k),
        context(cache_v),
        tuple(cache_mask(lengths, t, end - start, start) for start, end in itertools.pairwise(starts[: n + 1])),
        causal_block_mask(batch, t),
        rope_theta=rope_theta,
        eps=eps,
        taps=taps,
        lengths=lengths if fixed_order else None,
        rows=rows if fixed_order else None,
    )
    if fixed_order:
        return x, tapped, new_k, new_v
    reach = attend_len + t  # every real row's length is at most attend_len; padding rows write nowhere
    return (
        x,
        tapped,
        write_cache(cache_k, new_k, rows, lengths, reach),
        write_cache(cache_v, new_v, rows, lengths, reach),
    )


def embed_tokens(embed: jax.Array, tokens: jax.Array) -> jax.Array:
    """[V, D] table, [B, T] ids -> [D, N] feature-major embeddings."""
    return embed[tokens.reshape(-1)].T


def output_logits(
    x: jax.Array, final_norm: jax.Array, head: Weight, eps: float, fixed_order: bool = False
) -> jax.Array:
    """[D, N] residual stream -> [V', N] logits through the final norm and a [V', D] head.

    Logits stay vocabulary-major: on this CPU, XLA fuses a transpose to [N, V'] into the product and picks a kernel
    that is 20x slower for 2-4 tokens. Callers that need [B, T, V'] use `tokens_major` (training) or transpose on the
    host (serving).
    """
    return head @ rms_norm(x, final_norm, eps, fixed_order)


def tokens_major(x: jax.Array, batch: int) -> jax.Array:
    """[..., D, N] -> [B, T, ..., D]: feature-major states (or [V, N] logits) in the callers' token-major layout."""
    t = x.shape[-1] // batch
    x = jnp.moveaxis(x, -1, 0)  # [N, ..., D]
    return x.reshape(batch, t, *x.shape[1:])
