"""The Llama decoder block shared by the primary and the drafter.

Axis names used in every einsum and shape comment of the model files:
    B batch, T new tokens in this call, S attended context slots, L layers, D model width,
    K key/value heads, G query heads per key/value head, H head dim, F SwiGLU width, V vocabulary.

Attention always has two parts (DESIGN.md): a *context* (keys/values already computed: the KV cache for inference,
the primary's projected states for drafter training) and the *block* (keys/values of the T tokens of this call).
A softmax over both parts at once is the same as one softmax over their concatenation, but nothing is concatenated
and the cache is written only after the whole stack has run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Finite stand-in for -inf: a fully masked row then yields zeros instead of NaNs.
_MASKED = -1e30


@struct.dataclass
class LayerParams:
    """Weights of a stack of decoder layers, stacked along a leading L axis so the stack runs under `lax.scan`."""

    attn_norm: jax.Array  # [L, D]
    wq: jax.Array  # [L, D, K, G, H]
    wk: jax.Array  # [L, D, K, H]
    wv: jax.Array  # [L, D, K, H]
    wo: jax.Array  # [L, K, G, H, D]
    mlp_norm: jax.Array  # [L, D]
    w_gate: jax.Array  # [L, D, F]
    w_up: jax.Array  # [L, D, F]
    w_down: jax.Array  # [L, F, D]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis. x: [..., D], weight: [D]."""
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * weight


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for rotate-half RoPE.

    Args:
        positions: [B, T] integer positions.
        head_dim: H (even).
        theta: base frequency.

    Returns:
        (cos, sin), each [B, T, H]: the H/2 frequencies repeated over both halves of a head.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + H/2) of every head. x: [B, T, ..., H]; cos, sin: [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    extra = x.ndim - cos.ndim  # head axes between T and H
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    return x * cos + rotated * sin


def two_part_attention(
    q: jax.Array,
    ctx_k: jax.Array,
    ctx_v: jax.Array,
    ctx_mask: jax.Array,
    blk_k: jax.Array,
    blk_v: jax.Array,
    blk_mask: jax.Array,
) -> jax.Array:
    """Grouped-query attention over a context part and a block part with one joint softmax.

    Args:
        q: [B, T, K, G, H] queries (RoPE applied).
        ctx_k, ctx_v: [B, S, K, H] context keys/values (S may be 0).
        ctx_mask: [B, T, S] True where query t may read context slot s.
        blk_k, blk_v: [B, T, K, H] the block's own keys/values.
        blk_mask: [B, T, T] True where query t may read block token u.

    Returns:
        [B, T, K, G, H] attention output.
    """
    scale = q.shape[-1] ** -0.5
    s_ctx = jnp.einsum("BTKGH,BSKH->BKGTS", q, ctx_k) * scale
    s_blk = jnp.einsum("BTKGH,BUKH->BKGTU", q, blk_k) * scale
    s_ctx = jnp.where(ctx_mask[:, None, None], s_ctx, _MASKED)
    s_blk = jnp.where(blk_mask[:, None, None], s_blk, _MASKED)
    m = jnp.maximum(
        jnp.max(s_ctx, axis=-1, initial=_MASKED, keepdims=True), jnp.max(s_blk, axis=-1, keepdims=True)
    )  # [B, K, G, T, 1]
    p_ctx = jnp.where(ctx_mask[:, None, None], jnp.exp(s_ctx - m), 0.0)
    p_blk = jnp.where(blk_mask[:, None, None], jnp.exp(s_blk - m), 0.0)
    denom = jnp.sum(p_ctx, axis=-1, keepdims=True) + jnp.sum(p_blk, axis=-1, keepdims=True)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p_ctx, ctx_v) + jnp.einsum("BKGTU,BUKH->BTKGH", p_blk, blk_v)
    denom = jnp.moveaxis(denom, 3, 1)  # [B, K, G, T, 1] -> [B, T, K, G, 1]
    return out / jnp.maximum(denom, 1e-30)


def kv_projection(p: LayerParams, x_normed: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys (RoPE applied) and values of one layer: x_normed [B, T, D] after the attention norm -> 2 x [B, T, K, H]."""
    k = apply_rope(jnp.einsum("BTD,DKH->BTKH", x_normed, p.wk), cos, sin)
    v = jnp.einsum("BTD,DKH->BTKH", x_normed, p.wv)
    return k, v


def decoder_layer(
    p: LayerParams,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    ctx_k: jax.Array,
    ctx_v: jax.Array,
    ctx_mask: jax.Array,
    blk_mask: jax.Array,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm Llama block (attention + SwiGLU MLP) for a single layer's weights (no L axis).

    Args:
        p: one layer's weights.
        x: [B, T, D] residual stream of the block's tokens.
        cos, sin: [B, T, H] RoPE tables for the block's positions.
        ctx_k, ctx_v: [B, S, K, H] context keys/values.
        ctx_mask: [B, T, S].
        blk_mask: [B, T, T].
        eps: RMSNorm epsilon.

    Returns:
        (x_out [B, T, D], k [B, T, K, H], v [B, T, K, H]): the new residual stream and the block's own keys/values,
        which the caller may write to a cache.
    """
    h = rms_norm(x, p.attn_norm, eps)
    q = apply_rope(jnp.einsum("BTD,DKGH->BTKGH", h, p.wq), cos, sin)
    k, v = kv_projection(p, h, cos, sin)
    attn = two_part_attention(q, ctx_k, ctx_v, ctx_mask, k, v, blk_mask)
    x = x + jnp.einsum("BTKGH,KGHD->BTD", attn, p.wo)
    h = rms_norm(x, p.mlp_norm, eps)
    gated = jax.nn.silu(jnp.einsum("BTD,DF->BTF", h, p.w_gate)) * jnp.einsum("BTD,DF->BTF", h, p.w_up)
    return x + jnp.einsum("BTF,FD->BTD", gated, p.w_down), k, v


def decoder_stack(
    layers: LayerParams,
    x: jax.Array,
    positions: jax.Array,
    ctx_k: jax.Array,
    ctx_v: jax.Array,
    ctx_mask: jax.Array,
    blk_mask: jax.Array,
    *,
    rope_theta: float,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Runs all layers with `lax.scan` (compile time independent of depth).

    Args:
        layers: stacked weights, leading axis L.
        x: [B, T, D] embeddings of the block's tokens.
        positions: [B, T] absolute positions.
        ctx_k, ctx_v: [L, B, S, K, H] per-layer context keys/values.
        ctx_mask: [B, T, S]; blk_mask: [B, T, T].
        rope_theta: RoPE base.
        eps: RMSNorm epsilon.

    Returns:
        (x_out [B, T, D] before the final norm, hidden [L, B, T, D] residual stream after each layer,
        new_k [L, B, T, K, H], new_v [L, B, T, K, H]).
    """
    head_dim = layers.wk.shape[-1]
    cos, sin = rope_tables(positions, head_dim, rope_theta)

    def body(carry: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        p, ck, cv = xs
        out, k, v = decoder_layer(p, carry, cos, sin, ck, cv, ctx_mask, blk_mask, eps)
        return out, (out, k, v)

    x, (hidden, new_k, new_v) = jax.lax.scan(body, x, (layers, ctx_k, ctx_v))
    return x, hidden, new_k, new_v


def causal_block_mask(batch: int, t: int) -> jax.Array:
    """[B, T, T] lower-triangular mask: token t reads block tokens u <= t."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=bool)), (batch, t, t))


def cache_mask(lengths: jax.Array, t: int, s: int) -> jax.Array:
    """[B, T, S] mask reading cache slots s < lengths[b] (the same for every query of the block)."""
    return jnp.broadcast_to((jnp.arange(s)[None, :] < lengths[:, None])[:, None, :], (lengths.shape[0], t, s))


def write_cache(cache: jax.Array, new: jax.Array, rows: jax.Array, lengths: jax.Array) -> jax.Array:
    """Writes each selected row's block at its own offset.

    Args:
        cache: [L, R, S, K, H] over all R slots of the pool.
        new: [L, B, T, K, H] the block's keys or values.
        rows: [B] slot of each block row.
        lengths: [B] first position to write per row; positions past S are dropped.

    Returns:
        The updated cache (in place when the caller donates it).
    """
    positions = lengths[:, None] + jnp.arange(new.shape[2])[None, :]  # [B, T]
    return cache.at[:, rows[:, None], positions].set(new.astype(cache.dtype), mode="drop")


def cached_decoder_stack(
    layers: LayerParams,
    x: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    *,
    attend_len: int,
    rope_theta: float,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Runs the stack over a block that follows each row's cached prefix, then writes the block into the cache.

    Args:
        layers: stacked weights.
        x: [B, T, D] embeddings of the block, row b's tokens at positions lengths[b] .. lengths[b] + T - 1.
        rows: [B] cache slot of each block row (a subset of the pool, in any order).
        lengths: [B] cached positions of each row.
        cache_k, cache_v: [L, R, S, K, H] the whole pool (donated by callers).
        attend_len: static bucket of attended slots (>= max(lengths)).
        rope_theta: RoPE base.
        eps: RMSNorm epsilon.

    Returns:
        (x_out [B, T, D], hidden [L, B, T, D], cache_k, cache_v with the block written at lengths).
    """
    batch, t = x.shape[:2]
    positions = lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    x, hidden, new_k, new_v = decoder_stack(
        layers,
        x,
        positions,
        cache_k[:, rows, :attend_len],  # [L, B, S', K, H]
        cache_v[:, rows, :attend_len],
        cache_mask(lengths, t, attend_len),
        causal_block_mask(batch, t),
        rope_theta=rope_theta,
        eps=eps,
    )
    return x, hidden, write_cache(cache_k, new_k, rows, lengths), write_cache(cache_v, new_v, rows, lengths)
