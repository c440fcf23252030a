"""The primary: a Llama decoder run in block mode against a KV cache.

A block call feeds T new tokens per row at once and returns their logits and the residual stream of the tapped layers
(the representations the Tandem drafter reads). Read top to bottom: parameters, conversion from a Hugging Face state
dict, the block forward, and `PrimaryRunner`, which owns a cache and compiles one function per shape bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tandem.config import LlamaConfig
from tandem.formats.checkpoints import QuantBlocks
from tandem.model import kernels
from tandem.model.kernels import QLinear, QPanels, float_weight, to_panels
from tandem.model.kvcache import KVCache, bucket
from tandem.model.layers import (
    KVBuffers,
    LayerParams,
    Layers,
    Weight,
    cached_decoder_stack,
    causal_block_mask,
    decoder_stack,
    embed_tokens,
    fuse_layer,
    output_logits,
    tokens_major,
)


@struct.dataclass
class LlamaParams:
    """All primary weights. The output head is the embedding when tied (no copy is stored)."""

    embed: jax.Array  # [V, D]
    layers: Layers  # one LayerParams per layer
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [V, D] when untied, else None
    head_panels: QPanels | None = None  # the head's integer panels, when it came quantized

    @property
    def head(self) -> Weight:
        """[V, D] the output head (a QLinear when it has integer panels)."""
        w = self.embed if self.lm_head is None else self.lm_head
        return w if self.head_panels is None else QLinear(w, self.head_panels)


def params_from_state_dict(
    cfg: LlamaConfig,
    sd: dict[str, np.ndarray],
    dtype: jnp.dtype = jnp.float32,
    blocks: dict[str, QuantBlocks] | None = None,
    int8_activations: bool = False,
) -> LlamaParams:
    """Converts a Hugging Face Llama state dict ([out, in] matrices) into fused per-layer weights.

    Args:
        cfg: the model's config.
        sd: float arrays named like `model.layers.{i}.self_attn.q_proj.weight` (see tandem.formats.checkpoints).
        dtype: parameter dtype on device.
        blocks: the same matrices as integers with block scales (`checkpoints.gguf_quant_blocks`), whose dequantized
            values must be the arrays in `sd`. A fused weight whose parts all have blocks, and the head, then also get
            integer panels for the CPU kernel (`tandem.model.kernels`); nothing else changes.
        int8_activations: the layers' 4-bit panels and the head's 8-bit ones come in the dot forms
            (`kernels.QPanels.dot`): their products quantize each token's inputs to 8 bits per 32-input block,
            as llama.cpp's CPU products of Q4_1 and Q8_0 weights do, and run integer dot products. The model then
            differs from the float32 one by that rounding.

    Returns:
        LlamaParams; query head n belongs to key/value head n // G, as in HF's repeat_kv.
    """

    quantized = blocks if dtype == jnp.float32 else None  # the kernel computes in float32

    def panels(names: Sequence[str], dot: bool = False) -> QPanels | None:
        parts = [(quantized or {}).get(name) for name in names]
        if not parts or any(part is None for part in parts):
            return None
        q, scale, offset = (np.concatenate([part[j] for part in parts if part is not None]) for j in range(3))
        return to_panels(q, scale, offset, dot=dot)

    def weight(w: Weight, names: Sequence[str]) -> Weight:
        assert not isinstance(w, QLinear)  # fuse_layer gives float arrays
        found = panels(names, dot=int8_activations)
        return w if found is None else QLinear(w, found)

    def layer(i: int) -> LayerParams:
        w = {name: sd[f"model.layers.{i}.{name}.weight"] for name in _HF_LAYER_NAMES}
        fused = fuse_layer(
            w["input_layernorm"],
            w["self_attn.q_proj"],
            w["self_attn.k_proj"],
            w["self_attn.v_proj"],
            w["self_attn.o_proj"],
            w["post_attention_layernorm"],
            w["mlp.gate_proj"],
            w["mlp.up_proj"],
            w["mlp.down_proj"],
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            dtype=dtype,
        )
        name = functools.partial("model.layers.{}.{}.weight".format, i)
        return dataclasses.replace(
            fused,
            wqkv=weight(fused.wqkv, [name(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]),
            wo=weight(fused.wo, [name("self_attn.o_proj")]),
            w_gate_up=weight(fused.w_gate_up, [name("mlp.gate_proj"), name("mlp.up_proj")]),
            w_down=weight(fused.w_down, [name("mlp.down_proj")]),
        )

    head = None if cfg.tie_embeddings else jnp.asarray(sd["lm_head.weight"], dtype)
    head_name = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return LlamaParams(
        embed=jnp.asarray(sd["model.embed_tokens.weight"], dtype),
        layers=tuple(layer(i) for i in range(cfg.n_layers)),
        final_norm=jnp.asarray(sd["model.norm.weight"], dtype),
        lm_head=head,
        head_panels=panels([head_name], dot=int8_activations),
    )


def float_only(params: LlamaParams) -> LlamaParams:
    """The same weights with the integer panels dropped: every product runs in XLA on the float32 arrays (the
    kernel's baseline in `tandem bench`; no weights are copied)."""

    layers = tuple(
        dataclasses.replace(
            layer,
            wqkv=float_weight(layer.wqkv),
            wo=float_weight(layer.wo),
            w_gate_up=float_weight(layer.w_gate_up),
            w_down=float_weight(layer.w_down),
        )
        for layer in params.layers
    )
    return dataclasses.replace(params, layers=layers, head_panels=None)


_HF_LAYER_NAMES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def forward_block(
    params: LlamaParams,
    tokens: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: KVBuffers,
    cache_v: KVBuffers,
    *,
    cfg: LlamaConfig,
    taps: tuple[int, ...],
    attend_len: int,
    whole_pool: bool = False,
    fixed_order: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, KVBuffers, KVBuffers]:
    """One block pass: T new tokens per row after that row's cached prefix.

    Args:
        params: primary weights.
        tokens: [B, T] token ids; row b's tokens sit at positions lengths[b] .. lengths[b] + T - 1.
        rows: [B] cache slot of each row.
        lengths: [B] cached tokens per row (its slot holds positions < lengths[b]).
        cache_k, cache_v: the KV cache pool (`tandem.model.layers.KVBuffers`, donated by callers).
        cfg: static config.
        taps: static 1-indexed layers whose output residual stream is returned.
        attend_len: static number of cache positions attended (a bucket >= max(lengths)).
        whole_pool: static; rows are every slot in order and attention reads the cache in place (see
            `tandem.model.kvcache.KVCache`).
        fixed_order: static; attention and norms in the CPU kernels' fixed order (`cached_decoder_stack`).

    Returns:
        logits [V, N] (vocabulary-major, N = B*T; see `output_logits`); their argmax [B, T] (greedy requests copy
        only these ids to the host); tapped hidden
        states [B, T, n_taps, D]; the cache with the block's keys/values written at lengths .. lengths + T - 1 (the
        caller decides how many of them to keep by advancing its lengths).
    """
    batch = tokens.shape[0]
    x, tapped, cache_k, cache_v = cached_decoder_stack(
        params.layers,
        embed_tokens(params.embed, tokens),  # [D, N]
        rows,
        lengths,
        cache_k,
        cache_v,
        attend_len=attend_len,
        whole_pool=whole_pool,
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
        taps=taps,
        fixed_order=fixed_order,
    )
    logits = output_logits(x, params.final_norm, params.head, cfg.rms_eps, fixed_order)  # [V, N]
    top = kernels.argmax(logits) if fixed_order else jnp.argmax(logits, axis=0).astype(jnp.int32)  # [N]
    top = top.reshape(batch, -1)  # [B, T]
    return logits, top, tokens_major(tapped, batch), cache_k, cache_v


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
    empty = jnp.zeros((cfg.n_layers, batch, cfg.n_kv_heads, 0, cfg.head_dim), params.embed.dtype)  # [L, B, K, 0, H]
    x, tapped, _, _ = decoder_stack(
        params.layers,
        embed_tokens(params.embed, tokens),  # [D, N]
        jnp.broadcast_to(jnp.arange(t), (batch, t)),
        empty,
        empty,
        jnp.zeros((batch, t, 0), bool),
        causal_block_mask(batch, t),
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
        taps=taps,
    )
    logits = output_logits(x, params.final_norm, params.head, cfg.rms_eps)  # [V, N]
    return tokens_major(logits, batch), tokens_major(tapped, batch)


# One compiled function per (shapes, cfg, taps, attend_len, whole_pool, fixed_order), shared by every runner.
_forward_block_jit = jax.jit(
    forward_block, static_argnames=("cfg", "taps", "attend_len", "whole_pool", "fixed_order"), donate_argnums=(4, 5)
)


class BlockOutput:
    """One block pass over B rows, cut to the rows and tokens actually fed (padding removed); logits and states reach
    the host only when read (a greedy verify needs only the argmax ids). Row b's first sizes[b] tokens are real."""

    def __init__(self, logits: jax.Array, top: jax.Array, hidden: jax.Array, rows: np.ndarray, t: int) -> None:
        """rows [B]: the padded call's rows that hold the block's rows (see `tandem.model.kvcache.KVCache.apply`)."""
        self._logits, self._hidden, self._rows, self.t = logits, hidden, rows, t  # logits [V, B_pad * T_pad]
        self.top: np.ndarray = np.asarray(top)[rows, :t]  # [B, T] the primary's argmax tokens

    @functools.cached_property
    def logits(self) -> np.ndarray:
        """[B, T, V] (transposed on the host; see `tandem.model.layers.output_logits`)."""
        padded = self._hidden.shape[0]  # the padded batch
        return np.asarray(self._logits).T.reshape(padded, -1, self._logits.shape[0])[self._rows, : self.t]

    @functools.cached_property
    def hidden(self) -> np.ndarray:
        """[B, T, n_taps, D] the tapped layers' residual streams (cut on the host: slicing the device array would
        compile a slice for every distinct block length, mid-request)."""
        return np.asarray(self._hidden)[self._rows, : self.t]

    def __repr__(self) -> str:
        return f"BlockOutput(tokens={self.top.shape}, taps={self._hidden.shape[2]})"


class PrimaryRunner:
    """Runs block passes of the primary against its own KV cache (see `kvcache.KVCache` for the buckets)."""

    def __init__(
        self,
        cfg: LlamaConfig,
        params: LlamaParams,
        *,
        taps: Sequence[int] = (),
        batch: int = 1,
        max_len: int = 2048,
        dtype: jnp.dtype = jnp.float32,
        fixed_order: bool | None = None,
    ) -> None:
        """Args:
        fixed_order: attention and norms in the CPU kernels' fixed order, so that a token's outputs are bitwise the
            same in a one-token step, a k-token verify and any batch (`tandem.model.layers.cached_decoder_stack`);
            default: where the kernels run and the cache is float32.
        """
        if any(not 1 <= t <= cfg.n_layers for t in taps):
            raise ValueError(f"tapped layers {tuple(taps)} must lie in 1..{cfg.n_layers}")
        self.cfg, self.params, self.taps = cfg, params, tuple(taps)
        if fixed_order is None:
            fixed_order = dtype == jnp.float32 and params.embed.dtype == jnp.float32 and kernels.available()
        self.fixed_order = fixed_order
        self.cache = KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype, attend_all=fixed_order)
        self.batch, self.max_len = batch, max_len

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths

    def forward(
        self, tokens: np.ndarray, rows: Sequence[int] | None = None, sizes: Sequence[int] | None = None
    ) -> BlockOutput:
        """Runs one block of T tokens per row after each row's cached prefix; lengths are not advanced.

        Args:
            tokens: [B, T] int token ids.
            rows: the B cache slots the rows belong to (default: every slot, in order).
            sizes: [B] real tokens per row when rows from different sessions carry blocks of different lengths
                (default: T each); row b's tokens after sizes[b] are padding and its outputs there are meaningless.

        Returns:
            BlockOutput with logits [B, T, V] and tapped hidden states [B, T, n_taps, D].
        """
        tokens = np.asarray(tokens)
        _, out_rows, (logits, top, hidden) = self.cache.apply(
            _forward_block_jit,
            self.params,
            tokens,
            rows,
            sizes=None if sizes is None else np.asarray(sizes),
            cfg=self.cfg,
            taps=self.taps,
            fixed_order=self.fixed_order,
        )
        return BlockOutput(logits, top, hidden, out_rows, tokens.shape[1])

    def shapes(
        self, batches: Sequence[int], blocks: Sequence[int], attends: Sequence[int]
    ) -> set[tuple[int, int, int]]:
        """The (batch, block, attended-length) buckets calls of these sizes use: one compiled program each."""
        return {(bucket(b), bucket(t), self.cache.attend_bucket(a)) for b in batches for t in blocks for a in attends}

    def compile(self, shapes: Iterable[tuple[int, int, int]], run_upto: int = 0) -> int:
        """Compiles the block pass for every (batch, block, attended-length) bucket given (`shapes`), and the whole-pool
        call of batches that fill the pool (`KVCache.pool_call`), so requests never wait for a compile (a serving
        start-up step). A shape of at most `run_upto` padded tokens is also run once, on padding rows only (no slot's
        cache changes), so its first request finds jit's dispatch warm too; larger ones are compiled without running.

        Returns:
            How many shapes were compiled or found compiled.
        """
        shapes = set(shapes)
        for b, t, a in sorted(shapes):
            pool = self.cache.pool_call(b)
            b = self.batch if pool else b  # a whole-pool call has one row per slot
            rows, lengths = self.cache.padding_rows(b)  # host arrays, as `KVCache.apply` passes them
            args = (self.params, np.zeros((b, t), np.int32), rows, lengths, self.cache.k, self.cache.v)
            static = dict(cfg=self.cfg, taps=self.taps, attend_len=a, whole_pool=pool, fixed_order=self.fixed_order)
            self.cache.warm(_forward_block_jit, *args, run=b * t <= run_upto, **static)
        return len(shapes)

    def commit(self, row: int, n: int) -> None:
        """Keeps the first n tokens of the last block in `row`'s cache (a rollback drops the rest)."""
        self.cache.advance(row, n)

    def truncate(self, row: int, length: int) -> None:
        """Forgets every cached position >= length in `row`."""
        self.cache.truncate(row, length)
