"""The primary: a Llama decoder run in block mode against a KV cache.

A block call feeds T new tokens per row at once and returns their logits and the residual stream of the tapped layers
(the representations the Tandem drafter reads). Read top to bottom: parameters, conversion from a Hugging Face state
dict, the block forward, and `PrimaryRunner`, which owns a cache and compiles one function per shape bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tandem.config import LlamaConfig
from tandem.kvcache import KVCache
from tandem.layers import LayerParams, cached_decoder_stack, causal_block_mask, decoder_stack, rms_norm


@struct.dataclass
class LlamaParams:
    """All primary weights. The output head is the embedding when tied (no copy is stored)."""

    embed: jax.Array  # [V, D]
    layers: LayerParams  # stacked, leading axis L
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [V, D] when untied, else None


def params_from_state_dict(cfg: LlamaConfig, sd: dict[str, np.ndarray], dtype: jnp.dtype = jnp.float32) -> LlamaParams:
    """Converts Hugging Face Llama names and [out, in] layouts into stacked einsum-ready arrays.

    Args:
        cfg: the model's config.
        sd: float arrays named like `model.layers.{i}.self_attn.q_proj.weight` (see tandem.checkpoints).
        dtype: parameter dtype on device.

    Returns:
        LlamaParams with wq [L, D, K, G, H] etc. Query head n belongs to key/value head n // G, as in HF's repeat_kv.
    """
    d, k, g, h, f = cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.ffn_dim

    def stack(name: str) -> np.ndarray:
        return np.stack([sd[f"model.layers.{i}.{name}.weight"] for i in range(cfg.n_layers)])

    def arr(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, dtype=dtype)

    layers = LayerParams(
        attn_norm=arr(stack("input_layernorm")),
        wq=arr(stack("self_attn.q_proj").reshape(-1, k, g, h, d).transpose(0, 4, 1, 2, 3)),  # [L,KGH,D]->[L,D,K,G,H]
        wk=arr(stack("self_attn.k_proj").reshape(-1, k, h, d).transpose(0, 3, 1, 2)),  # [L,KH,D]->[L,D,K,H]
        wv=arr(stack("self_attn.v_proj").reshape(-1, k, h, d).transpose(0, 3, 1, 2)),
        wo=arr(stack("self_attn.o_proj").reshape(-1, d, k, g, h).transpose(0, 2, 3, 4, 1)),  # [L,D,KGH]->[L,K,G,H,D]
        mlp_norm=arr(stack("post_attention_layernorm")),
        w_gate=arr(stack("mlp.gate_proj").reshape(-1, f, d).transpose(0, 2, 1)),  # [L,F,D]->[L,D,F]
        w_up=arr(stack("mlp.up_proj").reshape(-1, f, d).transpose(0, 2, 1)),
        w_down=arr(stack("mlp.down_proj").reshape(-1, d, f).transpose(0, 2, 1)),  # [L,D,F]->[L,F,D]
    )
    head = None if cfg.tie_embeddings else arr(sd["lm_head.weight"])
    return LlamaParams(
        embed=arr(sd["model.embed_tokens.weight"]), layers=layers, final_norm=arr(sd["model.norm.weight"]), lm_head=head
    )


def output_logits(x: jax.Array, final_norm: jax.Array, head: jax.Array, eps: float) -> jax.Array:
    """[B, T, D] residual stream -> [B, T, V] logits through the final norm and the [V, D] head."""
    return jnp.einsum("BTD,VD->BTV", rms_norm(x, final_norm, eps), head)


def forward_block(
    params: LlamaParams,
    tokens: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    *,
    cfg: LlamaConfig,
    taps: tuple[int, ...],
    attend_len: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One block pass: T new tokens per row after that row's cached prefix.

    Args:
        params: primary weights.
        tokens: [B, T] token ids; row b's tokens sit at positions lengths[b] .. lengths[b] + T - 1.
        rows: [B] cache slot of each row.
        lengths: [B] cached tokens per row (its slot holds positions < lengths[b]).
        cache_k, cache_v: [L, R, S, K, H] the KV cache pool (donated by callers).
        cfg: static config.
        taps: static 1-indexed layers whose output residual stream is returned.
        attend_len: static number of cache slots attended (a bucket >= max(lengths)).

    Returns:
        logits [B, T, V]; tapped hidden states [B, T, n_taps, D]; the cache with the block's keys/values written at
        lengths .. lengths + T - 1 (the caller decides how many of them to keep by advancing its lengths).
    """
    x, hidden, cache_k, cache_v = cached_decoder_stack(
        params.layers,
        params.embed[tokens],  # [B, T, D]
        rows,
        lengths,
        cache_k,
        cache_v,
        attend_len=attend_len,
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
    )
    head = params.embed if params.lm_head is None else params.lm_head
    logits = output_logits(x, params.final_norm, head, cfg.rms_eps)
    tapped = jnp.moveaxis(hidden[jnp.asarray([layer - 1 for layer in taps], dtype=jnp.int32)], 0, 2)  # [B,T,n,D]
    return logits, tapped, cache_k, cache_v


def forward_sequence(
    params: LlamaParams, tokens: jax.Array, *, cfg: LlamaConfig, taps: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Whole sequences at once, no cache (training and evaluation of drafters against the frozen primary).

    Args:
        params: primary weights.
        tokens: [B, T] token ids at positions 0..T-1.
        cfg: static config.
        taps: static 1-indexed layers whose output residual stream is returned.

    Returns:
        logits [B, T, V] and tapped hidden states [B, T, n_taps, D], equal to a block pass over an empty cache.
    """
    batch, t = tokens.shape
    empty = jnp.zeros((cfg.n_layers, batch, 0, cfg.n_kv_heads, cfg.head_dim), params.embed.dtype)  # [L, B, 0, K, H]
    x, hidden, _, _ = decoder_stack(
        params.layers,
        params.embed[tokens],  # [B, T, D]
        jnp.broadcast_to(jnp.arange(t), (batch, t)),
        empty,
        empty,
        jnp.zeros((batch, t, 0), bool),
        causal_block_mask(batch, t),
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
    )
    head = params.embed if params.lm_head is None else params.lm_head
    tapped = jnp.moveaxis(hidden[jnp.asarray([layer - 1 for layer in taps], dtype=jnp.int32)], 0, 2)  # [B,T,n,D]
    return output_logits(x, params.final_norm, head, cfg.rms_eps), tapped


# One compiled function per (shapes, cfg, taps, attend_len), shared by every runner in the process.
_forward_block_jit = jax.jit(forward_block, static_argnames=("cfg", "taps", "attend_len"), donate_argnums=(4, 5))


@dataclasses.dataclass
class BlockOutput:
    """Host copies of one block pass, cut to the tokens actually fed (padding removed)."""

    logits: np.ndarray  # [B, T, V]
    hidden: np.ndarray  # [B, T, n_taps, D]

    def __repr__(self) -> str:
        return f"BlockOutput(logits={self.logits.shape}, hidden={self.hidden.shape})"


class PrimaryRunner:
    """Runs block passes of the primary against its own KV cache (see `tandem.kvcache.KVCache` for the buckets)."""

    def __init__(
        self,
        cfg: LlamaConfig,
        params: LlamaParams,
        *,
        taps: Sequence[int] = (),
        batch: int = 1,
        max_len: int = 2048,
        dtype: jnp.dtype = jnp.float32,
    ) -> None:
        if any(not 1 <= t <= cfg.n_layers for t in taps):
            raise ValueError(f"tapped layers {tuple(taps)} must lie in 1..{cfg.n_layers}")
        self.cfg, self.params, self.taps = cfg, params, tuple(taps)
        self.cache = KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype)
        self.batch, self.max_len = batch, max_len

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths

    def forward(self, tokens: np.ndarray, rows: Sequence[int] | None = None) -> BlockOutput:
        """Runs one block of T tokens per row after each row's cached prefix; lengths are not advanced.

        Args:
            tokens: [B, T] int token ids.
            rows: the B cache slots the rows belong to (default: every slot, in order).

        Returns:
            BlockOutput with logits [B, T, V] and tapped hidden states [B, T, n_taps, D].
        """
        t = np.shape(tokens)[-1]
        _, (logits, hidden) = self.cache.apply(
            _forward_block_jit, self.params, np.asarray(tokens), rows, cfg=self.cfg, taps=self.taps
        )
        return BlockOutput(logits=np.asarray(logits[:, :t]), hidden=np.asarray(hidden[:, :t]))

    def commit(self, row: int, n: int) -> None:
        """Keeps the first n tokens of the last block in `row`'s cache (a rollback drops the rest)."""
        self.cache.advance(row, n)

    def truncate(self, row: int, length: int) -> None:
        """Forgets every cached position >= length in `row`."""
        self.cache.truncate(row, length)
