"""The secondary (drafter): a small Llama decoder that, in Tandem mode, attends to the primary's representations.

Indexing convention (pinned here, reproduced by the training mask and by inference):
    The drafter's position i holds token x_i and predicts x_{i+1}. Let b(i) be the last position the primary had
    processed when x_{i+1} is drafted. At drafter layer j, query i reads keys/values computed from the projected
    primary state  ŷ_p = proj[j] @ h_primary[layer_map[j]][p]  for positions p <= b(i), and from the drafter's own
    residual stream for b(i) < p <= i. One source per position: replacement, not concatenation.

    Inference: the primary has processed positions < m and emitted the token at position m (its free token, or a
    verification's correction/bonus). The drafter feeds x_m, then its own drafts, so every query of the round has
    b(i) = m - 1: the primary predicts the first token of each round and the drafter the rest.

    Training with block length P: rounds start at multiples of P, so b(i) = floor(i / P) * P - 1. Query i reads the
    primary's states for positions before its round and its own states for its round's positions up to i. The
    parallel training forward and the incremental path agree exactly on this pattern (tests/test_secondary.py).

Both paths run `tandem.layers.decoder_stack`: the primary's projected states form the attention context, the drafter's
own tokens the block. At inference the context is a KV cache whose slots < m hold primary-derived keys/values and
whose slots m.. hold the round's own keys/values until verification replaces them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from safetensors.numpy import load_file, save_file

from tandem.config import DrafterConfig
from tandem.kvcache import KVCache
from tandem.layers import (
    LayerParams,
    cached_decoder_stack,
    causal_block_mask,
    decoder_stack,
    kv_projection,
    rms_norm,
    rope_tables,
    write_cache,
)
from tandem.primary import output_logits


@struct.dataclass
class DrafterParams:
    """Drafter weights; the output head is tied to the embedding.

    With `cfg.shared_embed` the trained weight is `embed_proj` and `embed` is derived from the primary's embedding
    (`materialize`); training keeps `embed` None and derives it inside the loss. With `cfg.head_vocab` the output head
    is `head` = embed[head_ids], built once at load time (slicing weights inside jit would copy them every call).
    """

    embed: jax.Array | None  # [V, D]; None only in a shared-embedding drafter's trainable parameters
    layers: LayerParams  # stacked, leading axis L (drafter layers)
    final_norm: jax.Array  # [D]
    proj: jax.Array | None  # [L, P, D] per-layer projection from primary width P; None for the vanilla drafter
    embed_proj: jax.Array | None = None  # [P, D] when cfg.shared_embed: embed = primary_embed @ embed_proj
    head_ids: jax.Array | None = None  # [N] int32 token ids of a restricted head (cfg.head_vocab == N)
    head: jax.Array | None = None  # [N, D] = embed[head_ids]


def init_params(cfg: DrafterConfig, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> DrafterParams:
    """Random initialisation (normal, std 0.02; norms at 1; projections scaled by 1/sqrt(P)).

    A shared-embedding drafter gets `embed_proj` instead of `embed` (call `materialize` before running it); a
    restricted head starts as the first `head_vocab` ids.
    """
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
    n, d, k, g, h, f = cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.ffn_dim

    def normal(shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
        return (std * jax.random.normal(next(keys), shape)).astype(dtype)

    layers = LayerParams(
        attn_norm=jnp.ones((n, d), dtype),
        wq=normal((n, d, k, g, h)),
        wk=normal((n, d, k, h)),
        wv=normal((n, d, k, h)),
        wo=normal((n, k, g, h, d)),
        mlp_norm=jnp.ones((n, d), dtype),
        w_gate=normal((n, d, f)),
        w_up=normal((n, d, f)),
        w_down=normal((n, f, d)),
    )
    proj = normal((n, cfg.primary_d_model, d), cfg.primary_d_model**-0.5) if cfg.tandem else None
    embed_proj = normal((cfg.primary_d_model, d), cfg.primary_d_model**-0.5) if cfg.shared_embed else None
    return DrafterParams(
        embed=None if cfg.shared_embed else normal((cfg.vocab_size, d)),
        layers=layers,
        final_norm=jnp.ones((d,), dtype),
        proj=proj,
        embed_proj=embed_proj,
        head_ids=jnp.arange(cfg.head_vocab, dtype=jnp.int32) if cfg.head_vocab else None,
    )


def materialize(
    params: DrafterParams, cfg: DrafterConfig, primary_embed: jax.Array | np.ndarray | None = None
) -> DrafterParams:
    """Derives the runnable tables: `embed` from the primary's embedding (shared) and `head` from `head_ids`.

    Args:
        params: drafter weights as trained or loaded.
        cfg: drafter config.
        primary_embed: [V, P] the primary's token embedding; required when cfg.shared_embed.

    Returns:
        Params whose `embed` is [V, D] and, with a restricted head, whose `head` is [N, D].
    """
    if cfg.shared_embed:
        if primary_embed is None or params.embed_proj is None:
            raise ValueError("a shared-embedding drafter needs the primary's embedding and its embed_proj")
        if primary_embed.shape != (cfg.vocab_size, cfg.primary_d_model):
            raise ValueError(f"primary embedding {primary_embed.shape} != ({cfg.vocab_size}, {cfg.primary_d_model})")
        embed = jnp.einsum("VP,PD->VD", jnp.asarray(primary_embed, params.embed_proj.dtype), params.embed_proj)
        params = dataclasses.replace(params, embed=embed)
    assert params.embed is not None
    if params.head_ids is not None:
        params = dataclasses.replace(params, head=params.embed[params.head_ids])
    return params


def primary_context_kv(
    params: DrafterParams, cfg: DrafterConfig, primary_hidden: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Keys/values every drafter layer derives from the primary's representations.

    Args:
        params: drafter weights (Tandem).
        cfg: drafter config.
        primary_hidden: [B, S, n_taps, P] the primary's tapped residual streams, taps ordered as cfg.tapped_layers.
        positions: [B, S] their positions.

    Returns:
        (k, v), each [L, B, S, K, H]: layer j's attention norm and key/value projections applied to
        ŷ = proj[j] @ h_primary[layer_map[j]].
    """
    assert params.proj is not None, "the vanilla drafter reads no primary states"
    per_layer = primary_hidden[:, :, jnp.asarray(cfg.tap_index, dtype=jnp.int32)]  # [B, S, L, P]
    y_hat = jnp.einsum("BSLP,LPD->LBSD", per_layer.astype(params.proj.dtype), params.proj)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

    def one_layer(p: LayerParams, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return kv_projection(p, rms_norm(y, p.attn_norm, cfg.rms_eps), cos, sin)

    return jax.vmap(one_layer)(params.layers, y_hat)


def _logits(params: DrafterParams, cfg: DrafterConfig, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] logits; a restricted head scores its N ids and leaves the rest at -1e30."""
    if params.head is None:
        assert params.embed is not None
        return output_logits(x, params.final_norm, params.embed, cfg.rms_eps)
    assert params.head_ids is not None
    scores = output_logits(x, params.final_norm, params.head, cfg.rms_eps)  # [B, T, N]
    full = jnp.full((*scores.shape[:-1], cfg.vocab_size), -1e30, scores.dtype)  # [B, T, V]
    return full.at[..., params.head_ids].set(scores)


def train_forward(
    params: DrafterParams,
    cfg: DrafterConfig,
    tokens: jax.Array,
    primary_hidden: jax.Array | None,
    block_len: int,
    offset: jax.Array | int = 0,
) -> jax.Array:
    """Parallel forward over whole sequences with the round-structured mask (see the module docstring).

    Args:
        params: drafter weights (materialized).
        cfg: drafter config.
        tokens: [B, T] token ids at positions 0..T-1.
        primary_hidden: [B, T, n_taps, P] the primary's tapped states for the same positions (None when vanilla).
        block_len: P, the number of positions the drafter feeds per round (static).
        offset: rounds start at positions offset + n * P (may be traced); positions before the first round see no
            primary states. Evaluation uses it to place a round at any position.

    Returns:
        [B, T, V] logits; row i predicts token i + 1.
    """
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
    i = jnp.arange(t)
    last_seen = ((i - offset) // block_len) * block_len + offset - 1  # b(i), [T]
    if cfg.tandem:
        assert primary_hidden is not None, "a Tandem drafter needs the primary's states"
        ctx_k, ctx_v = primary_context_kv(params, cfg, primary_hidden, positions)
        ctx_mask = jnp.broadcast_to(i[None, :] <= last_seen[:, None], (batch, t, t))  # [B, T(query), S(=T)]
        blk_mask = (i[None, :] > last_seen[:, None]) & (i[None, :] <= i[:, None])  # [T, T]
        blk_mask = jnp.broadcast_to(blk_mask, (batch, t, t))
    else:
        kv_shape = (cfg.n_layers, batch, 0, cfg.n_kv_heads, cfg.head_dim)
        ctx_k = ctx_v = jnp.zeros(kv_shape, params.layers.wq.dtype)
        ctx_mask = jnp.zeros((batch, t, 0), bool)
        blk_mask = causal_block_mask(batch, t)
    assert params.embed is not None, "call materialize() first"
    x, _, _, _ = decoder_stack(
        params.layers,
        params.embed[tokens],
        positions,
        ctx_k,
        ctx_v,
        ctx_mask,
        blk_mask,
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
    )
    return _logits(params, cfg, x)


def step(
    params: DrafterParams,
    tokens: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    *,
    cfg: DrafterConfig,
    attend_len: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Incremental forward of T new tokens per row against the cache (causal over cache slots < lengths).

    Args:
        params: drafter weights.
        tokens: [B, T] ids at positions lengths .. lengths + T - 1.
        rows: [B] cache slot of each row.
        lengths: [B] valid cache positions per row.
        cache_k, cache_v: [L, R, S, K, H] the pool (donated).
        cfg: static config.
        attend_len: static bucket of attended cache slots.

    Returns:
        (logits [B, T, V], cache_k, cache_v) with the tokens' own keys/values written at lengths.
    """
    assert params.embed is not None, "call materialize() first"
    x, _, cache_k, cache_v = cached_decoder_stack(
        params.layers,
        params.embed[tokens],
        rows,
        lengths,
        cache_k,
        cache_v,
        attend_len=attend_len,
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
    )
    return _logits(params, cfg, x), cache_k, cache_v


def ingest(
    params: DrafterParams,
    primary_hidden: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    *,
    cfg: DrafterConfig,
) -> tuple[jax.Array, jax.Array]:
    """Writes keys/values derived from the primary's states for T positions starting at lengths (replacing own ones).

    Args:
        params: drafter weights (Tandem).
        primary_hidden: [B, T, n_taps, P].
        rows: [B] cache slot of each row.
        lengths: [B] first position per row.
        cache_k, cache_v: [L, R, S, K, H] the pool (donated).
        cfg: static config.

    Returns:
        The updated caches.
    """
    positions = lengths[:, None] + jnp.arange(primary_hidden.shape[1])[None, :]
    k, v = primary_context_kv(params, cfg, primary_hidden, positions)
    return write_cache(cache_k, k, rows, lengths), write_cache(cache_v, v, rows, lengths)


_step_jit = jax.jit(step, static_argnames=("cfg", "attend_len"), donate_argnums=(4, 5))
_ingest_jit = jax.jit(ingest, static_argnames=("cfg",), donate_argnums=(4, 5))


class DrafterRunner:
    """Runs the drafter against its own KV cache (see `tandem.kvcache.KVCache` for the buckets).

    Slots < lengths[b] are what the drafter may attend to: primary-derived keys/values for positions the primary has
    processed (Tandem) and the drafter's own keys/values for the round in progress.
    """

    def __init__(
        self, cfg: DrafterConfig, params: DrafterParams, *, batch: int = 1, max_len: int = 2048, dtype=jnp.float32
    ) -> None:
        if params.embed is None or (params.head_ids is not None and params.head is None):
            raise ValueError("drafter params are not runnable: call tandem.secondary.materialize() first")
        self.cfg, self.params, self.batch, self.max_len = cfg, params, batch, max_len
        self.cache = KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype)

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths

    def step(self, tokens: np.ndarray, rows: Sequence[int] | None = None) -> np.ndarray:
        """Feeds [B, T] tokens to `rows` (default: all slots) and advances their lengths by T.

        Returns:
            [B, V] logits of each row's last token.
        """
        t = np.shape(tokens)[1]
        slots, (logits,) = self.cache.apply(_step_jit, self.params, np.asarray(tokens), rows, cfg=self.cfg)
        self.cache.lengths[slots] += t
        return np.asarray(logits[:, t - 1])

    def ingest(self, primary_hidden: np.ndarray, rows: Sequence[int] | None = None) -> None:
        """Replaces positions lengths .. lengths + T - 1 of `rows` with primary-derived keys/values; advances by T.

        Args:
            primary_hidden: [B, T, n_taps, P] the primary's tapped states for those positions.
            rows: the B slots (default: all slots).
        """
        slots, _ = self.cache.apply(
            _ingest_jit, self.params, primary_hidden, rows, dtype=np.float32, attends=False, cfg=self.cfg
        )
        self.cache.lengths[slots] += primary_hidden.shape[1]

    def truncate(self, row: int, length: int) -> None:
        """Forgets every slot >= length in `row` (rollback of rejected or superseded positions)."""
        self.cache.truncate(row, length)


# --- checkpoints: safetensors weights + JSON config, no pickle ---

_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerParams))


def save_drafter(directory: Path, cfg: DrafterConfig, params: DrafterParams, dtype: str = "float32") -> None:
    """Writes `config.json` and `model.safetensors` (float32 or float16 storage) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensors = {"final_norm": params.final_norm}
    tensors.update({f"layers.{name}": getattr(params.layers, name) for name in _LAYER_FIELDS})
    # A shared-embedding drafter stores its projection; the [V, D] table is derived from the primary at load time.
    embed = None if cfg.shared_embed else params.embed
    optional = {"embed": embed, "proj": params.proj, "embed_proj": params.embed_proj}
    tensors.update({k: v for k, v in optional.items() if v is not None})
    arrays = {k: np.asarray(v, dtype=dtype) for k, v in tensors.items()}
    if params.head_ids is not None:
        arrays["head_ids"] = np.asarray(params.head_ids, dtype=np.int32)
    save_file(arrays, str(directory / "model.safetensors"))


def load_drafter(
    directory: Path, primary_embed: jax.Array | np.ndarray | None = None, dtype: jnp.dtype = jnp.float32
) -> tuple[DrafterConfig, DrafterParams]:
    """Reads a drafter written by `save_drafter`, casting to dtype, and materializes it.

    Args:
        directory: holds config.json and model.safetensors.
        primary_embed: [V, P] the primary's token embedding; required for a shared-embedding drafter.
        dtype: parameter dtype.

    Returns:
        (config, runnable params).
    """
    cfg = DrafterConfig.from_dict(json.loads((directory / "config.json").read_text()))
    t = load_file(str(directory / "model.safetensors"))

    def arr(name: str) -> jax.Array:
        return jnp.asarray(t[name], dtype=dtype)

    if cfg.tandem != ("proj" in t):
        raise ValueError(
            f"{directory}: config says tandem={cfg.tandem} but projections are {'present' if 'proj' in t else 'absent'}"
        )
    if cfg.shared_embed != ("embed_proj" in t) or cfg.shared_embed == ("embed" in t):
        raise ValueError(f"{directory}: config says shared_embed={cfg.shared_embed} but the tensors disagree")
    if bool(cfg.head_vocab) != ("head_ids" in t) or ("head_ids" in t and t["head_ids"].shape != (cfg.head_vocab,)):
        raise ValueError(f"{directory}: config says head_vocab={cfg.head_vocab} but head_ids disagree")
    layers = LayerParams(**{name: arr(f"layers.{name}") for name in _LAYER_FIELDS})
    params = DrafterParams(
        embed=None if cfg.shared_embed else arr("embed"),
        layers=layers,
        final_norm=arr("final_norm"),
        proj=arr("proj") if cfg.tandem else None,
        embed_proj=arr("embed_proj") if cfg.shared_embed else None,
        head_ids=jnp.asarray(t["head_ids"], jnp.int32) if cfg.head_vocab else None,
    )
    return cfg, materialize(params, cfg, primary_embed)
