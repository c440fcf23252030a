"""The drafter: a small Llama decoder that, in Tandem mode, attends to the primary's representations.

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
    parallel training forward and the incremental path agree exactly on this pattern (tests/unit/test_drafter.py).

Both paths run `layers.decoder_stack`: the primary's projected states form the attention context, the drafter's
own tokens the block. At inference the context is a KV cache whose slots < m hold primary-derived keys/values and
whose slots m.. hold the round's own keys/values until verification replaces them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from safetensors.numpy import load_file, save_file

from tandem.config import DrafterConfig
from tandem.errors import ContextFullError
from tandem.model import kernels
from tandem.model.kernels import BLOCK, PANEL, QLinear, float_weight, qlinear, quantize_q8
from tandem.model.kvcache import KVCache, bucket, buckets, rows_per_call
from tandem.model.layers import (
    KVBuffers,
    LayerParams,
    Layers,
    Weight,
    cached_decoder_stack,
    causal_block_mask,
    decoder_layer,
    decoder_stack,
    embed_tokens,
    fuse_layer,
    output_logits,
    qkv_projection,
    rms_norm,
    rope_tables,
    segment_starts,
    tokens_major,
    write_cache,
)
from tandem.model.router import RouterParams, confidence


@struct.dataclass
class DrafterParams:
    """Drafter weights; the output head is tied to the embedding.

    With `cfg.shared_embed` the trained weight is `embed_proj` and `embed` is derived from the primary's embedding
    (`materialize`); training keeps `embed` None and derives it inside the loss. With `cfg.head_vocab` the output head
    is `head` = embed[head_ids], built once at load time (slicing weights inside jit would copy them every call).
    """

    embed: jax.Array | None  # [V, D]; None only in a shared-embedding drafter's trainable parameters
    layers: Layers  # one LayerParams per drafter layer
    final_norm: jax.Array  # [D]
    proj: tuple[Weight, ...] | None  # per layer [D, P] from primary width P; None for the vanilla drafter
    embed_proj: jax.Array | None = None  # [P, D] when cfg.shared_embed: embed = primary_embed @ embed_proj
    head_ids: jax.Array | None = None  # [N] int32 token ids of a restricted head (cfg.head_vocab == N)
    head: Weight | None = None  # [N, D] = embed[head_ids] (Q8_0 blocks once `quantize`d)
    fuse_feat: Weight | None = None  # [D, n_taps * P] the primary's states -> input ("features" form)
    fuse_emb: Weight | None = None  # [D, D] the token embedding -> input ("features" form)


def init_params(cfg: DrafterConfig, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> DrafterParams:
    """Random initialisation (normal, std 0.02; norms at 1; projections scaled by 1/sqrt(P)).

    A shared-embedding drafter gets `embed_proj` instead of `embed` (call `materialize` before running it); a
    restricted head starts as the first `head_vocab` ids.
    """
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8 + 8 * cfg.n_layers))
    n, d, k, g, h, f = cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.ffn_dim

    def normal(shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
        return (std * jax.random.normal(next(keys), shape)).astype(dtype)

    def layer() -> LayerParams:
        q, wk, wv, o = (np.asarray(normal(shape)) for shape in ((k * g * h, d), (k * h, d), (k * h, d), (d, k * g * h)))
        gate, up, down = (np.asarray(normal(shape)) for shape in ((f, d), (f, d), (d, f)))
        ones = np.ones(d, np.float32)
        return fuse_layer(ones, q, wk, wv, o, ones, gate, up, down, n_kv_heads=k, head_dim=h, dtype=dtype)

    layers = tuple(layer() for _ in range(n))
    p = cfg.primary_d_model
    proj = tuple(normal((d, p), p**-0.5) for _ in range(n)) if cfg.tandem and not cfg.features else None
    embed_proj = normal((p, d), p**-0.5) if cfg.shared_embed else None
    taps = len(cfg.feature_layers)
    fuse_feat = normal((d, taps * p), (taps * p) ** -0.5) if cfg.features else None
    fuse_emb = normal((d, d), d**-0.5) if cfg.features else None
    return DrafterParams(
        embed=None if cfg.shared_embed else normal((cfg.vocab_size, d)),
        layers=layers,
        final_norm=jnp.ones((d,), dtype),
        proj=proj,
        embed_proj=embed_proj,
        head_ids=jnp.arange(cfg.head_vocab, dtype=jnp.int32) if cfg.head_vocab else None,
        fuse_feat=fuse_feat,
        fuse_emb=fuse_emb,
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


def quantize(params: DrafterParams, int8_activations: bool = False) -> DrafterParams:
    """The serving form on a CPU with the int8 kernel: every matrix a drafting round multiplies by (the layers'
    products, the projections of the primary's states and the head) as Q8_0 blocks (`tandem.model.kernels.QLinear`).

    A round reads each of them once, right after the primary's pass has evicted them from the caches, so on this CPU
    its cost follows the bytes it streams: ~32 MB of float32 weights against ~10 MB of integers and scales. Lossy, like
    any quantization, but only in what the drafter proposes: verification stays exact. `embed` stays float (a round
    gathers one row of it), and so does the head's float copy the router reads the top tokens' embeddings from.

    Args:
        params: materialized drafter weights.
        int8_activations: the products quantize their inputs to 8 bits too (the dot form, `QPanels.dot`), as the
            primary's do: integer dot products, fewer instructions per weight than dequantizing to float.

    Returns:
        The same params with QLinear products (a matrix the kernel cannot take, with inputs not a multiple of 32 or
        outputs not a multiple of 8, stays float).
    """

    def q8(w: Weight) -> Weight:
        if isinstance(w, QLinear) or w.shape[0] % PANEL or w.shape[1] % BLOCK:
            return w
        return qlinear(*quantize_q8(np.asarray(w, np.float32)), dot=int8_activations)

    layers = tuple(
        dataclasses.replace(p, wqkv=q8(p.wqkv), wo=q8(p.wo), w_gate_up=q8(p.w_gate_up), w_down=q8(p.w_down))
        for p in params.layers
    )
    proj = None if params.proj is None else tuple(q8(w) for w in params.proj)
    head = None if params.head is None else q8(params.head)
    fuse_feat = None if params.fuse_feat is None else q8(params.fuse_feat)
    fuse_emb = None if params.fuse_emb is None else q8(params.fuse_emb)
    return dataclasses.replace(params, layers=layers, proj=proj, head=head, fuse_feat=fuse_feat, fuse_emb=fuse_emb)


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
        (k, v), each [L, B, K, S, H]: layer j's attention norm and key/value projections applied to
        ŷ = proj[j] @ h_primary[layer_map[j]].
    """
    assert params.proj is not None, "the vanilla drafter reads no primary states"
    batch, length = positions.shape
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    ks, vs = [], []
    for j, (p, proj) in enumerate(zip(params.layers, params.proj, strict=True)):
        h = primary_hidden[:, :, cfg.tap_index[j]].reshape(batch * length, -1).T  # [P, N]
        y_hat = proj @ h.astype(proj.dtype)  # [D, N]
        _, k, v = qkv_projection(p, rms_norm(y_hat, p.attn_norm, cfg.rms_eps), cos, sin)  # [K, H, N] each
        ks.append(jnp.transpose(k.reshape(*k.shape[:2], batch, length), (2, 0, 3, 1)))  # [B, K, S, H]
        vs.append(jnp.transpose(v.reshape(*v.shape[:2], batch, length), (2, 0, 3, 1)))
    return jnp.stack(ks), jnp.stack(vs)


def _inputs(
    params: DrafterParams,
    cfg: DrafterConfig,
    tokens: jax.Array,
    features: jax.Array | None = None,
    own: jax.Array | None = None,
) -> jax.Array:
    """The first layer's input [D, N] for [B, T] tokens.

    The "features" form adds one product of the primary's states at each token's previous position (`features`
    [B, T, n_taps, P], taps ordered as cfg.tapped_layers), or, inside a drafting round, the drafter's own output there
    (`own` [D, N]); other drafters embed the tokens alone.
    """
    assert params.embed is not None, "call materialize() first"
    emb = embed_tokens(params.embed, tokens)  # [D, N]
    if not cfg.features:
        return emb
    assert params.fuse_feat is not None and params.fuse_emb is not None
    if own is None:
        assert features is not None, "a feature-level drafter needs the primary's states or its own outputs"
        order = jnp.asarray(cfg.tap_index)  # the fused layers' order among the primary's taps
        feats = features[:, :, order].reshape(tokens.size, -1).T  # [n_taps * P, N]
        own = params.fuse_feat @ feats.astype(params.final_norm.dtype)  # [D, N]
    return own + params.fuse_emb @ emb


def shift_features(primary_hidden: jax.Array) -> jax.Array:
    """[B, T, n_taps, P] states of positions 0..T-1 -> the features of positions 0..T-1: position i reads the states
    of position i - 1 (zeros at position 0, which nothing precedes)."""
    return jnp.pad(primary_hidden, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def feature_round_steps(
    params: DrafterParams, cfg: DrafterConfig, tokens: jax.Array, features: jax.Array, steps: int
) -> list[jax.Array]:
    """A feature-level drafter's parallel forward for every depth of a drafting round ("training-time test").

    At depth s every position i is taken as the (s + 1)-th position of a round that starts at m = i - s: the round's
    first position reads the primary's states (`features`), later ones the drafter's own output one position back at
    depth s - 1. Attention matches the incremental path exactly: positions <= m hold keys/values computed from the
    primary's states (depth 0), position m + t those of depth t.

    Args:
        params: drafter weights (materialized).
        cfg: a "features" drafter config.
        tokens: [B, T] token ids at positions 0..T-1.
        features: [B, T, n_taps, P] the primary's states at each position's previous one (`shift_features`).
        steps: how many depths (>= 1).

    Returns:
        Per depth s, the last layer's output [D, N] (before the final norm); row i at depth s predicts token i + 1.
    """
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    i = jnp.arange(t)
    causal = jnp.broadcast_to(i[None, :] <= i[:, None], (batch, t, t))
    itself = jnp.broadcast_to(i[None, :] == i[:, None], (batch, t, t))
    depth_kv: list[list[tuple[jax.Array, jax.Array]]] = []  # [depth][layer] -> (k, v) [B, K, T, H]
    outs: list[jax.Array] = []
    own = None
    for s in range(steps):
        x = _inputs(params, cfg, tokens, features, own)
        layer_kv = []
        for j, p in enumerate(params.layers):
            if s == 0:
                ctx: tuple[tuple, tuple, tuple] = ((), (), ())
                blk = causal
            else:  # depth 0's keys up to the round's start m = i - s, depth u's at position m + u, its own at i
                ks = [depth_kv[u][j][0] for u in range(s)]
                vs = [depth_kv[u][j][1] for u in range(s)]
                masks = [jnp.broadcast_to(i[None, :] <= i[:, None] - s, (batch, t, t))]
                masks += [jnp.broadcast_to(i[None, :] == i[:, None] - s + u, (batch, t, t)) for u in range(1, s)]
                ctx, blk = (tuple(ks), tuple(vs), tuple(masks)), itself
            x, k, v = decoder_layer(p, x, cos, sin, *ctx, blk, cfg.rms_eps)
            layer_kv.append((k, v))
        depth_kv.append(layer_kv)
        outs.append(x)
        # the next depth's feature at position i is this depth's output at position i - 1
        shifted = jnp.pad(x.reshape(x.shape[0], batch, t), ((0, 0), (0, 0), (1, 0)))[:, :, :t]
        own = shifted.reshape(x.shape[0], batch * t)
    return outs


def _logits(params: DrafterParams, cfg: DrafterConfig, x: jax.Array) -> jax.Array:
    """[D, N] -> [V, N] logits (vocabulary-major); a restricted head scores its ids and leaves the rest at -1e30."""
    if params.head is None:
        assert params.embed is not None
        return output_logits(x, params.final_norm, params.embed, cfg.rms_eps)
    assert params.head_ids is not None
    scores = output_logits(x, params.final_norm, params.head, cfg.rms_eps)  # [N_head, N]
    full = jnp.full((cfg.vocab_size, scores.shape[1]), -1e30, scores.dtype)  # [V, N]
    return full.at[params.head_ids].set(scores)


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
    x = train_outputs(params, cfg, tokens, primary_hidden, block_len, offset)
    return tokens_major(_logits(params, cfg, x), tokens.shape[0])


def train_outputs(
    params: DrafterParams,
    cfg: DrafterConfig,
    tokens: jax.Array,
    primary_hidden: jax.Array | None,
    block_len: int,
    offset: jax.Array | int = 0,
) -> jax.Array:
    """`train_forward`'s last-layer outputs [D, N] (before the final norm and the head); same arguments."""
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
    i = jnp.arange(t)
    last_seen = ((i - offset) // block_len) * block_len + offset - 1  # b(i), [T]
    if cfg.features:
        assert primary_hidden is not None, "a feature-level drafter needs the primary's states"
        outs = feature_round_steps(params, cfg, tokens, shift_features(primary_hidden), block_len)
        depth = jnp.where(i >= offset, (i - offset) % block_len, 0)  # [T] each position's depth in its round
        return jnp.stack(outs)[jnp.tile(depth, batch), :, jnp.arange(batch * t)].T  # [D, N]
    if cfg.tandem:
        assert primary_hidden is not None, "a Tandem drafter needs the primary's states"
        ctx_k, ctx_v = primary_context_kv(params, cfg, primary_hidden, positions)
        ctx_mask = jnp.broadcast_to(i[None, :] <= last_seen[:, None], (batch, t, t))  # [B, T(query), S(=T)]
        blk_mask = (i[None, :] > last_seen[:, None]) & (i[None, :] <= i[:, None])  # [T, T]
        blk_mask = jnp.broadcast_to(blk_mask, (batch, t, t))
    else:
        kv_shape = (cfg.n_layers, batch, cfg.n_kv_heads, 0, cfg.head_dim)
        ctx_k = ctx_v = jnp.zeros(kv_shape, params.final_norm.dtype)
        ctx_mask = jnp.zeros((batch, t, 0), bool)
        blk_mask = causal_block_mask(batch, t)
    assert params.embed is not None, "call materialize() first"
    x, _, _, _ = decoder_stack(
        params.layers,
        embed_tokens(params.embed, tokens),  # [D, N]
        positions,
        ctx_k,
        ctx_v,
        ctx_mask,
        blk_mask,
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
    )
    return x


def _advance(
    params: DrafterParams,
    tokens: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: KVBuffers,
    cache_v: KVBuffers,
    *,
    cfg: DrafterConfig,
    attend_len: int,
    whole_pool: bool = False,
    fixed_order: bool = False,
    features: jax.Array | None = None,
    own: jax.Array | None = None,
) -> tuple[jax.Array, KVBuffers, KVBuffers]:
    """The stack over T new tokens per row: (x [D, N] before the final norm, cache_k, cache_v). fixed_order: the CPU
    kernels' attention and norms (`layers.cached_decoder_stack`), which read each row's cache slot in place.
    features / own: a feature-level drafter's inputs besides the tokens (`_inputs`)."""
    x, _, cache_k, cache_v = cached_decoder_stack(
        params.layers,
        _inputs(params, cfg, tokens, features, own),  # [D, N]
        rows,
        lengths,
        cache_k,
        cache_v,
        attend_len=attend_len,
        whole_pool=whole_pool,
        rope_theta=cfg.rope_theta,
        eps=cfg.rms_eps,
        fixed_order=fixed_order,
    )
    return x, cache_k, cache_v


def step(
    params: DrafterParams,
    tokens: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: KVBuffers,
    cache_v: KVBuffers,
    *,
    cfg: DrafterConfig,
    attend_len: int,
    whole_pool: bool = False,
    fixed_order: bool = False,
    features: jax.Array | None = None,
    own: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, KVBuffers, KVBuffers]:
    """Incremental forward of T new tokens per row against the cache (causal over cache slots < lengths).

    Args:
        params: drafter weights.
        tokens: [B, T] ids at positions lengths .. lengths + T - 1.
        rows: [B] cache slot of each row.
        lengths: [B] valid cache positions per row.
        cache_k, cache_v: the pool (`tandem.model.layers.KVBuffers`, donated).
        cfg: static config.
        attend_len: static bucket of attended cache slots.
        whole_pool: static; rows are every slot in order, read in place (see `tandem.model.kvcache.KVCache`).
        fixed_order: static; the CPU kernels' attention and norms (`DrafterRunner.fixed_order`).
        features: a feature-level drafter's [B, T, n_taps, P] primary states at each token's previous position.
        own: instead of features, its own last-layer outputs [B, T, D] at the previous positions (inside a round).

    Returns:
        (logits [V, B*T] vocabulary-major, x [D, B*T] the last layer's outputs, cache_k, cache_v) with the tokens'
        own keys/values written at lengths.
    """
    x, cache_k, cache_v = _advance(
        params,
        tokens,
        rows,
        lengths,
        cache_k,
        cache_v,
        cfg=cfg,
        attend_len=attend_len,
        whole_pool=whole_pool,
        fixed_order=fixed_order,
        features=features,
        own=None if own is None else own.reshape(-1, own.shape[-1]).T,  # [D, N]
    )
    return _logits(params, cfg, x), x, cache_k, cache_v


def ingest(
    params: DrafterParams,
    primary_hidden: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: KVBuffers,
    cache_v: KVBuffers,
    *,
    cfg: DrafterConfig,
) -> tuple[KVBuffers, KVBuffers]:
    """Writes keys/values derived from the primary's states for T positions starting at lengths (replacing own ones).

    Args:
        params: drafter weights (Tandem).
        primary_hidden: [B, T, n_taps, P].
        rows: [B] cache slot of each row.
        lengths: [B] first position per row.
        cache_k, cache_v: the pool (`tandem.model.layers.KVBuffers`, donated).
        cfg: static config.

    Returns:
        The updated caches.
    """
    positions = lengths[:, None] + jnp.arange(primary_hidden.shape[1])[None, :]
    k, v = primary_context_kv(params, cfg, primary_hidden, positions)
    return write_cache(cache_k, k, rows, lengths), write_cache(cache_v, v, rows, lengths)


def draft_greedy(
    params: DrafterParams,
    router: RouterParams | None,
    tokens: jax.Array,
    fed: jax.Array,
    rows: jax.Array,
    lengths: jax.Array,
    cache_k: KVBuffers,
    cache_v: KVBuffers,
    gamma: jax.Array,
    tau: jax.Array,
    tau_first: jax.Array,
    primary_hidden: jax.Array | None = None,
    ingested: jax.Array | None = None,
    *,
    cfg: DrafterConfig,
    attend_len: int,
    cap: int,
    top_k: int,
    fixed_order: bool = False,
) -> tuple[jax.Array, jax.Array, KVBuffers, KVBuffers]:
    """Whole greedy drafting rounds of B sessions in one call: write each row's new primary states (Tandem), feed its
    pending tokens, then draft until τ or γ.

    Draft j is the head's argmax after the previous one; a row keeps drafting while it has fewer than γ drafts and the
    router's confidence in its last draft reaches τ (τ <= 0: always). A row whose first draft's confidence is below
    its τ_first declines the round: no drafts (τ_first <= 0: never). Each draft except a row's last is fed back. One
    step advances every row still drafting; a row that stopped leaves the step (its writes go past the cache's end and
    are dropped, its drafts and length stay as they are). All rows still drafting hold the same number of drafts.

    Args:
        params: drafter weights (materialized).
        router: the router's weights, or None for the max-probability fallback.
        tokens: [B, T] the pending tokens (t_0 and, vanilla, the backlog), padded to a bucket.
        fed: [B] how many of each row's tokens are real (>= 1).
        rows: [B] the sessions' cache slots.
        lengths: [B] their cached positions.
        cache_k, cache_v: the pool (`tandem.model.layers.KVBuffers`, donated).
        gamma: [B] most drafts per row, 1 <= gamma <= cap (0 for a padding row: it never drafts).
        tau: [B] τ per row.
        tau_first: [B] the confidence each row's first draft needs (`SpecConfig.first_tau`).
        primary_hidden: [B, S, n_taps, P] the primary's states of each row's last round (t_0, d_1..d_a), written
            from lengths on as `ingest` writes them, before the pending tokens; one device call per round instead of
            two. None: nothing to write (a vanilla drafter, or states ingested already). A feature-level drafter
            instead takes [B, T, n_taps, P]: the states at each pending token's previous position, its inputs.
        ingested: [B] how many of primary_hidden's positions are real per row (0..S); the pending tokens follow them
            and overwrite the padding's writes.
        cfg: static config.
        attend_len: static bucket covering every row's lengths + ingested + fed + gamma.
        cap: static size of the drafts buffer.
        top_k: static router feature size.
        fixed_order: static; the CPU kernels' attention and norms (`DrafterRunner.fixed_order`).

    Returns:
        (drafts [B, cap] with row b's first count[b] valid, count [B] (0: declined), cache_k, cache_v); row b's cache
        holds positions up to lengths[b] + ingested[b] + fed[b] + max(count[b], 1) - 2 (its last draft is not fed).
    """
    head = params.embed if params.head is None else params.head  # [N_h, D]
    assert head is not None, "call materialize() first"
    features = primary_hidden if cfg.features else None
    if primary_hidden is not None and not cfg.features:
        assert ingested is not None, "primary_hidden needs ingested"
        cache_k, cache_v = ingest(params, primary_hidden, rows, lengths, cache_k, cache_v, cfg=cfg)
        lengths = lengths + ingested  # [B] where each row's pending tokens go
    head_ids = params.head_ids
    batch, t = tokens.shape
    beyond = jnp.full_like(lengths, segment_starts(cache_k[0])[-1])  # a write position past the cache's end: dropped

    def decide(x: jax.Array, drafted: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [D, B] -> (each row's next draft [B], whether it keeps drafting after it [B], its confidence [B])."""
        scores = output_logits(x, params.final_norm, head, cfg.rms_eps)  # [N_h, B]
        best = jnp.argmax(scores, axis=0)  # [B]
        token = best if head_ids is None else head_ids[best]
        conf = confidence(router, scores.T, float_weight(head), top_k)  # [B]
        return token.astype(jnp.int32), (drafted < gamma) & ((tau <= 0) | (conf >= tau)), conf

    advance = functools.partial(_advance, cfg=cfg, attend_len=attend_len, fixed_order=fixed_order)
    x, cache_k, cache_v = advance(params, tokens, rows, lengths, cache_k, cache_v, features=features)
    last = x.reshape(x.shape[0], batch, t)[:, jnp.arange(batch), fed - 1]  # [D, B] each row's last real token
    first, go, conf = decide(last, jnp.int32(1))
    speculate = (tau_first <= 0) | (conf >= tau_first)  # [B] rows that draft at all this round
    go = go & speculate
    drafts = jnp.zeros((batch, cap), jnp.int32).at[:, 0].set(first)

    def body(carry: tuple) -> tuple:
        i, prev, before, length, drafts, ck, cv, go = carry
        at = jnp.where(go, length, beyond)  # [B] rows that stopped write nowhere
        # a feature-level drafter reads its own output at the previous position, the one that drafted `prev`
        own = before if cfg.features else None
        x, ck, cv = advance(params, prev[:, None], rows, at, ck, cv, own=own)  # x [D, B]
        token, more, _ = decide(x, i + 1)
        drafts = jnp.where(go[:, None], drafts.at[:, i].set(token), drafts)
        prev = jnp.where(go, token, prev)
        return i + 1, prev, x, length + go, drafts, ck, cv, go & more

    init = (jnp.int32(1), first, last, lengths + fed, drafts, cache_k, cache_v, go)
    _, _, _, length, drafts, cache_k, cache_v, _ = jax.lax.while_loop(lambda c: jnp.any(c[-1]), body, init)
    count = jnp.where(speculate, length - lengths - fed + 1, 0)  # [B] drafts per row: every draft but the last was fed
    return drafts, count, cache_k, cache_v


def stack_states(states: Sequence[np.ndarray | None], batch: int, width: int, tail: tuple[int, ...]) -> np.ndarray:
    """Per-row primary states ([n_b, *tail] each; None: none) as one zero-padded [batch, width, *tail] float32 block,
    row b's first n_b positions real (what `ingest` and `draft_greedy` take with their per-row sizes)."""
    out = np.zeros((batch, width, *tail), np.float32)
    for b, h in enumerate(states):
        if h is not None:
            out[b, : h.shape[0]] = h
    return out


# The drafts buffer is at least this wide (γ_max's default bucket): rounds stop on device anyway, and one width for
# every γ up to 8 keeps the compiled shapes few.
_DRAFTS_WIDTH = 8
# A Tandem round's new primary states (t_0 and the accepted drafts: 1 + a positions) are written by the drafting call
# itself, padded to the first of these widths that holds them. On this CPU an ingest call of their own cost 0.25-0.6 ms
# per round more, most of it the call itself: right after the primary's pass the drafter's call runs cold (measured
# 0.15 ms back to back, 0.8 ms after a primary step). One width covers the default γ_max = 1 and adds no compiled
# shapes; a prompt's states, and a round's wider ones (γ_max > 1), are ingested by a call of their own first.
INGEST_WIDTHS = (2,)
_step_jit = jax.jit(step, static_argnames=("cfg", "attend_len", "whole_pool", "fixed_order"), donate_argnums=(4, 5))
_draft_greedy_jit = jax.jit(
    draft_greedy, static_argnames=("cfg", "attend_len", "cap", "top_k", "fixed_order"), donate_argnums=(6, 7)
)
_ingest_jit = jax.jit(ingest, static_argnames=("cfg",), donate_argnums=(4, 5))


class DrafterRunner:
    """Runs the drafter against its own KV cache (see `tandem.model.kvcache.KVCache` for the buckets).

    Slots < lengths[b] are what the drafter may attend to: primary-derived keys/values for positions the primary has
    processed (Tandem) and the drafter's own keys/values for the round in progress.
    """

    def __init__(
        self, cfg: DrafterConfig, params: DrafterParams, *, batch: int = 1, max_len: int = 2048, dtype=jnp.float32
    ) -> None:
        if params.embed is None or (params.head_ids is not None and params.head is None):
            raise ValueError("drafter params are not runnable: call tandem.model.drafter.materialize() first")
        self.cfg, self.params, self.batch, self.max_len = cfg, params, batch, max_len
        # Attention and norms in the CPU kernels, which read each row's cache slot in place (XLA's gather the rows'
        # attended segments out of the pool first) and write the block into it; float32 only.
        self.fixed_order = dtype == jnp.float32 and kernels.available()
        kv = cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype
        self.cache = KVCache(*kv, attend_all=self.fixed_order)

    @property
    def lengths(self) -> np.ndarray:
        return self.cache.lengths

    def step(
        self,
        tokens: np.ndarray,
        rows: Sequence[int] | None = None,
        features: np.ndarray | None = None,
        own: np.ndarray | None = None,
    ) -> np.ndarray:
        """Feeds [B, T] tokens to `rows` (default: all slots) and advances their lengths by T.

        Args:
            tokens: [B, T] token ids.
            rows: the B slots.
            features: a feature-level drafter's [B, T, n_taps, P] primary states at each token's previous position.
            own: instead of features, its own outputs [B, T, D] there (drafted tokens: `last_outputs` of the step
                that drafted them).

        Returns:
            [B, V] logits of each row's last token; its last-layer outputs there are kept in `last_outputs` [B, D].
        """
        t = np.shape(tokens)[1]
        extra = {name: a for name, a in (("features", features), ("own", own)) if a is not None}
        if self.cfg.features != bool(extra):
            raise ValueError("a feature-level drafter steps with features or its own outputs, other drafters without")
        slots, out_rows, (logits, x) = self.cache.apply(
            _step_jit, self.params, np.asarray(tokens), rows, extra=extra, cfg=self.cfg, fixed_order=self.fixed_order
        )
        self.cache.lengths[slots] += t
        t_pad = bucket(t)
        self.last_outputs = np.asarray(x)[:, t - 1 :: t_pad].T[out_rows]  # [B, D]
        return np.asarray(logits)[:, t - 1 :: t_pad].T[out_rows]  # each row's last fed token (host slicing)

    def draft_greedy(
        self,
        pending: Sequence[Sequence[int]],
        rows: Sequence[int],
        gamma: Sequence[int],
        tau: Sequence[float],
        router: RouterParams | None,
        top_k: int,
        tau_first: Sequence[float] | None = None,
        hidden: Sequence[np.ndarray | None] | None = None,
    ) -> list[list[int]]:
        """Writes each row's new primary states (Tandem), feeds its pending tokens and drafts greedily until τ or γ,
        every row in one call (`draft_greedy`).

        Args:
            pending: per row, the tokens the drafter has not seen yet (at least one), after its states.
            rows: the rows' distinct cache slots.
            gamma: per row, the most drafts (>= 1).
            tau: per row, τ.
            router: the router's weights, or None for the max-probability fallback.
            top_k: the router's feature size.
            tau_first: per row, the confidence the first draft needs, or the row declines the round (None: never).
            hidden: a Tandem drafter's rows' new primary states, [n_b, n_taps, P] each (None for a row with none),
                written at each row's length before its pending tokens (None: no row has any). A feature-level
                drafter's are its inputs instead: for every row, the states at each pending token's previous
                position, [len(pending[b]), n_taps, P].

        Returns:
            Per row the drafts d_1..d_k (k <= gamma; 0 when declined); each row's length advances by its states and
            the tokens fed (the pending ones and every draft but d_k).
        """
        slots = self.cache.rows(rows)
        fed = np.asarray([len(p) for p in pending], np.int32)
        gammas = np.asarray(gamma, np.int32)
        states = [None] * slots.size if hidden is None else list(hidden)
        tail = (len(self.cfg.tapped_layers), self.cfg.primary_d_model)
        features = None
        if self.cfg.features:
            if any(h is None or h.shape[0] != n for h, n in zip(states, fed, strict=True)):
                raise ValueError("a feature-level drafter needs the states at every pending token's previous position")
            features = stack_states(states, slots.size, int(fed.max()), tail)
            states = [None] * slots.size  # inputs, not positions to write
        ingested = np.asarray([0 if h is None else h.shape[0] for h in states], np.int32)
        if ingested.max() > INGEST_WIDTHS[-1]:  # too wide to write in the drafting call: a call of their own first
            big = [b for b, n in enumerate(ingested) if n > INGEST_WIDTHS[-1]]
            wide = stack_states([states[b] for b in big], len(big), int(ingested.max()), tail)
            self.ingest(wide, rows=slots[big].tolist(), sizes=ingested[big].tolist())
            for b in big:
                states[b] = None
            ingested[big] = 0
        longest = self.cache.lengths[slots] + ingested + fed + gammas
        if (longest > self.max_len).any():
            i = int(np.argmax(longest > self.max_len))
            raise ContextFullError(
                f"context full: {int(self.cache.lengths[slots[i]])} cached + {int(ingested[i] + fed[i])} pending + "
                f"{int(gammas[i])} drafts exceed max_len {self.max_len}"
            )
        block = np.zeros((slots.shape[0], int(fed.max())), np.int32)
        for b, p in enumerate(pending):
            block[b, : len(p)] = p
        tokens = self.cache.pad_block(block, slots, fed)
        pad_slots, pad_lengths = self.cache.padded_rows(slots)
        b_pad, cap = tokens.shape[0], bucket(int(gammas.max()), _DRAFTS_WIDTH)
        primary_hidden = None
        if features is not None:
            primary_hidden = self.cache.pad_block(features, slots, fed, np.float32)  # laid out like the tokens
        elif self.cfg.tandem:  # always through the ingesting call, so one compiled shape serves rounds with and without
            width = next(w for w in INGEST_WIDTHS if w >= ingested.max())
            primary_hidden = stack_states(states, b_pad, width, tail)
        elif hidden is not None:
            raise ValueError("a vanilla drafter reads no primary states")
        written = 0 if primary_hidden is None or features is not None else primary_hidden.shape[1]
        ahead = max(tokens.shape[1], int(fed.max()) + cap) + written
        attend = self.cache.attend_len(slots, ahead=ahead)
        drafts, count, self.cache.k, self.cache.v = _draft_greedy_jit(
            self.params,
            router,
            tokens,
            np.pad(fed, (0, b_pad - fed.size), constant_values=1),
            pad_slots,
            pad_lengths,
            self.cache.k,
            self.cache.v,
            np.pad(gammas, (0, b_pad - gammas.size)),
            np.pad(np.asarray(tau, np.float32), (0, b_pad - gammas.size)),
            np.pad(np.asarray(tau_first or [0.0] * gammas.size, np.float32), (0, b_pad - gammas.size)),
            primary_hidden,
            None if primary_hidden is None or features is not None else np.pad(ingested, (0, b_pad - ingested.size)),
            cfg=self.cfg,
            attend_len=attend,
            cap=cap,
            top_k=top_k,
            fixed_order=self.fixed_order,
        )
        counts = np.asarray(count)[: slots.size]
        self.cache.lengths[slots] += ingested + fed + np.maximum(counts, 1) - 1  # a declined row was fed its pending
        drafts = np.asarray(drafts)
        return [[int(t) for t in drafts[b, :n]] for b, n in enumerate(counts)]

    def compile(self, batches: Sequence[int], router: RouterParams | None, top_k: int) -> int:
        """Compiles a Tandem drafter's greedy serving path, so requests never wait for it (a start-up step): drafting
        rounds (`draft_greedy` writing states of each `INGEST_WIDTHS` and feeding t_0 alone, drafts buffer 8) and
        ingests of every length bucket, for every batch bucket given and attended-length bucket (`serving_shapes`).
        Compiles without running (`compile_shape`). A vanilla drafter's rounds (which feed whole
        prompts) and sampled rounds compile on first use.

        Args:
            batches: batch sizes (bucketed).
            router: the router's weights the greedy rounds use, or None for the max-probability fallback.
            top_k: the router's feature size.

        Returns:
            How many shapes were compiled or found compiled.
        """
        for shape in self.serving_shapes(batches):
            self.compile_shape(shape, router, top_k)
        return len(self.serving_shapes(batches))

    def serving_shapes(self, batches: Sequence[int]) -> list[tuple[str, int, int]]:
        """What `compile` compiles, smallest first: ("round", batch, ingest width) for every attended-length bucket
        and ("ingest", batch, length)."""
        if not self.cfg.tandem or self.cfg.features:
            raise ValueError("only a Tandem drafter of the layer-map form has its serving shapes compiled ahead")
        shapes = []
        for b in sorted({bucket(n) for n in batches}):
            shapes += [("round", b, width) for width in INGEST_WIDTHS]
            shapes += [("ingest", b, t) for t in buckets(self.max_len, cap=self.max_len) if b <= rows_per_call(t)]
        return sorted(shapes, key=lambda s: (s[1] * s[2], s))

    def compile_shape(
        self, shape: tuple[str, int, int], router: RouterParams | None, top_k: int, run_upto: int = 0
    ) -> None:
        """Compiles one of `serving_shapes`; one of at most `run_upto` padded tokens (batch x length) also runs once, on
        padding rows only (no slot's cache changes), so its first request finds jit's dispatch warm too."""
        kind, b, t = shape
        hidden = (len(self.cfg.tapped_layers), self.cfg.primary_d_model)
        # Host arrays, as draft_greedy's and ingest's callers pass them (the compiled-function cache tells host and
        # device arguments apart).
        pad_rows, pad_lengths = self.cache.padding_rows(b)
        run = b * t <= run_upto
        if kind == "ingest":
            states = np.zeros((b, t, *hidden), np.float32)
            ingest = (self.params, states, pad_rows, pad_lengths, self.cache.k, self.cache.v)
            self.cache.warm(_ingest_jit, *ingest, run=run, cfg=self.cfg)
            return
        for a in self.cache.attend_buckets():
            args = (
                self.params,
                router,
                np.zeros((b, 1), np.int32),
                np.ones(b, np.int32),
                pad_rows,
                pad_lengths,
                self.cache.k,
                self.cache.v,
                np.zeros(b, np.int32),
                np.zeros(b, np.float32),
                np.zeros(b, np.float32),
                np.zeros((b, t, *hidden), np.float32),
                np.zeros(b, np.int32),
            )
            static = dict(cfg=self.cfg, attend_len=a, cap=_DRAFTS_WIDTH, top_k=top_k, fixed_order=self.fixed_order)
            self.cache.warm(_draft_greedy_jit, *args, run=run, **static)

    def ingest(
        self, primary_hidden: np.ndarray, rows: Sequence[int] | None = None, sizes: Sequence[int] | None = None
    ) -> None:
        """Replaces positions lengths .. lengths + T - 1 of `rows` with primary-derived keys/values; advances them.

        Args:
            primary_hidden: [B, T, n_taps, P] the primary's tapped states for those positions.
            rows: the B slots (default: all slots).
            sizes: [B] real positions per row when rows carry different numbers (default: T each); each row's
                length advances by its own size.
        """
        if self.cfg.features:
            raise ValueError("a feature-level drafter reads the primary's states as inputs (step, draft_greedy)")
        t = primary_hidden.shape[1]
        real = None if sizes is None else np.asarray(sizes)
        slots, _, _ = self.cache.apply(
            _ingest_jit, self.params, primary_hidden, rows, sizes=real, dtype=np.float32, attends=False, cfg=self.cfg
        )
        self.cache.lengths[slots] += t if real is None else real

    def truncate(self, row: int, length: int) -> None:
        """Forgets every slot >= length in `row` (rollback of rejected or superseded positions)."""
        self.cache.truncate(row, length)


# --- checkpoints: safetensors weights + JSON config, no pickle ---

# On disk, layers keep the stacked einsum layout the shipped drafters were written in:
#   attn_norm, mlp_norm [L, D]; wq [L, D, K, G, H]; wk, wv [L, D, K, H]; wo [L, K, G, H, D]; w_gate, w_up [L, D, F];
#   w_down [L, F, D]; proj [L, P, D].


def _stored_layers(layers: Layers, proj: tuple[Weight, ...] | None) -> dict[str, np.ndarray]:
    """Per-layer fused [out, in] weights -> the stacked on-disk tensors."""
    k, h, g = layers[0].n_kv_heads, layers[0].head_dim, layers[0].group_size
    d = layers[0].wqkv.shape[1]
    f = layers[0].w_down.shape[1]

    def stack(fn: Callable[[np.ndarray, LayerParams], np.ndarray]) -> np.ndarray:
        return np.stack([fn(np.asarray(p.wqkv), p) for p in layers])

    out = {
        "attn_norm": np.stack([np.asarray(p.attn_norm) for p in layers]),
        "wq": stack(lambda w, p: w[: k * g * h].reshape(k, g, h, d).transpose(3, 0, 1, 2)),
        "wk": stack(lambda w, p: w[k * g * h : k * (g + 1) * h].reshape(k, h, d).transpose(2, 0, 1)),
        "wv": stack(lambda w, p: w[k * (g + 1) * h :].reshape(k, h, d).transpose(2, 0, 1)),
        "wo": stack(lambda w, p: np.asarray(p.wo).reshape(d, k, g, h).transpose(1, 2, 3, 0)),
        "mlp_norm": np.stack([np.asarray(p.mlp_norm) for p in layers]),
        "w_gate": stack(lambda w, p: np.asarray(p.w_gate_up)[:f].T),
        "w_up": stack(lambda w, p: np.asarray(p.w_gate_up)[f:].T),
        "w_down": stack(lambda w, p: np.asarray(p.w_down).T),
    }
    stored = {f"layers.{name}": a for name, a in out.items()}
    if proj is not None:
        stored["proj"] = np.stack([np.asarray(float_weight(w)).T for w in proj])
    return stored


def _layers_from_stored(t: dict[str, np.ndarray], cfg: DrafterConfig, dtype: jnp.dtype) -> Layers:
    """The stacked on-disk tensors -> per-layer fused [out, in] weights."""
    d = cfg.d_model

    def layer(i: int) -> LayerParams:
        w = {name: t[f"layers.{name}"][i] for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm")}
        return fuse_layer(
            w["attn_norm"],
            w["wq"].transpose(1, 2, 3, 0).reshape(-1, d),  # [D, K, G, H] -> [K*G*H, D]
            w["wk"].transpose(1, 2, 0).reshape(-1, d),  # [D, K, H] -> [K*H, D]
            w["wv"].transpose(1, 2, 0).reshape(-1, d),
            w["wo"].transpose(3, 0, 1, 2).reshape(d, -1),  # [K, G, H, D] -> [D, K*G*H]
            w["mlp_norm"],
            t["layers.w_gate"][i].T,  # [D, F] -> [F, D]
            t["layers.w_up"][i].T,
            t["layers.w_down"][i].T,  # [F, D] -> [D, F]
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            dtype=dtype,
        )

    return tuple(layer(i) for i in range(cfg.n_layers))


def save_drafter(directory: Path, cfg: DrafterConfig, params: DrafterParams, dtype: str = "float32") -> None:
    """Writes `config.json` and `model.safetensors` (float32 or float16 storage) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensors: dict[str, np.ndarray | jax.Array] = {"final_norm": params.final_norm}
    tensors.update(_stored_layers(params.layers, params.proj))
    # A shared-embedding drafter stores its projection; the [V, D] table is derived from the primary at load time.
    embed = None if cfg.shared_embed else params.embed
    optional = {
        "embed": embed,
        "embed_proj": params.embed_proj,
        "fuse_feat": None if params.fuse_feat is None else float_weight(params.fuse_feat),
        "fuse_emb": None if params.fuse_emb is None else float_weight(params.fuse_emb),
    }
    tensors.update({k: v for k, v in optional.items() if v is not None})
    # safetensors writes an array's buffer as is, so every array must be C-contiguous (a stack of transposes is not).
    arrays = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
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

    if cfg.features != ("fuse_feat" in t and "fuse_emb" in t):
        raise ValueError(f"{directory}: config says reads={cfg.reads!r} but the fused-input weights disagree")
    if (cfg.tandem and not cfg.features) != ("proj" in t):
        raise ValueError(
            f"{directory}: config says tandem={cfg.tandem} but projections are {'present' if 'proj' in t else 'absent'}"
        )
    if cfg.shared_embed != ("embed_proj" in t) or cfg.shared_embed == ("embed" in t):
        raise ValueError(f"{directory}: config says shared_embed={cfg.shared_embed} but the tensors disagree")
    if bool(cfg.head_vocab) != ("head_ids" in t) or ("head_ids" in t and t["head_ids"].shape != (cfg.head_vocab,)):
        raise ValueError(f"{directory}: config says head_vocab={cfg.head_vocab} but head_ids disagree")
    params = DrafterParams(
        embed=None if cfg.shared_embed else arr("embed"),
        layers=_layers_from_stored(t, cfg, dtype),
        final_norm=arr("final_norm"),
        proj=tuple(jnp.asarray(w.T, dtype) for w in t["proj"]) if "proj" in t else None,  # [P, D] -> [D, P]
        embed_proj=arr("embed_proj") if cfg.shared_embed else None,
        head_ids=jnp.asarray(t["head_ids"], jnp.int32) if cfg.head_vocab else None,
        fuse_feat=arr("fuse_feat") if cfg.features else None,
        fuse_emb=arr("fuse_emb") if cfg.features else None,
    )
    return cfg, materialize(params, cfg, primary_embed)
