"""The drafter: one code path for training (parallel, round mask) and inference (incremental, cache)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, drafter_config

from tandem.config import DrafterConfig, SpecConfig, default_layer_map
from tandem.decoding.speculative import MaxProbRouter, keep_drafting, speculates
from tandem.model import drafter as drafter_model
from tandem.model import kernels
from tandem.model.router import MLPRouter, RouterConfig, init_router

T = 11


def _inputs(cfg: DrafterConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, T))
    hidden = rng.standard_normal((2, T, len(cfg.tapped_layers) or 1, cfg.primary_d_model)).astype(np.float32)
    return tokens, hidden


def _incremental_tandem(cfg, params, tokens, hidden, block_len: int) -> np.ndarray:
    """Replays inference: per round, the primary's states for earlier positions are ingested, then the drafter feeds
    the round's tokens one at a time (its own keys/values), exactly as the engine does between verifications."""
    runner = drafter_model.DrafterRunner(cfg, params, batch=tokens.shape[0], max_len=64)
    logits = []
    for start in range(0, T, block_len):
        if start:
            runner.truncate(0, start - block_len)
            runner.truncate(1, start - block_len)
            runner.ingest(hidden[:, start - block_len : start])
        for i in range(start, min(start + block_len, T)):
            logits.append(runner.step(tokens[:, i : i + 1]))
    return np.stack(logits, axis=1)


@pytest.mark.parametrize("block_len", [1, 2, 3])
def test_tandem_training_forward_equals_incremental(block_len: int) -> None:
    cfg = drafter_config(True)
    params = drafter_model.init_params(cfg, seed=block_len)
    tokens, hidden = _inputs(cfg)
    parallel = np.asarray(drafter_model.train_forward(params, cfg, jnp.asarray(tokens), jnp.asarray(hidden), block_len))
    incremental = _incremental_tandem(cfg, params, tokens, hidden, block_len)
    np.testing.assert_allclose(incremental, parallel, atol=1e-5)


@pytest.mark.parametrize("block_len", [1, 2, 3])
def test_feature_training_forward_equals_incremental(block_len: int) -> None:
    """The feature-level form's parallel forward (every depth of a round at once) equals inference: each round's
    first position reads the primary's states of the position before it, later ones the drafter's own output there,
    and after the round its positions are fed again with the primary's states (as the drafter worker does)."""
    cfg = drafter_config(True, reads="features", feature_layers=(1, TINY.n_layers))
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=block_len), cfg)
    tokens, hidden = _inputs(cfg)
    parallel = np.asarray(drafter_model.train_forward(params, cfg, jnp.asarray(tokens), jnp.asarray(hidden), block_len))
    features = np.asarray(drafter_model.shift_features(jnp.asarray(hidden)))  # position i reads states of i - 1
    runner = drafter_model.DrafterRunner(cfg, params, batch=2, max_len=64)
    logits, fed = [], 0  # fed: positions holding keys/values from the primary's states
    for start in range(0, T, block_len):
        for row in (0, 1):
            runner.truncate(row, fed)
        if start > fed:  # the last round's later positions, again with the primary's states
            runner.step(tokens[:, fed:start], features=features[:, fed:start])
        logits.append(runner.step(tokens[:, start : start + 1], features=features[:, start : start + 1]))
        fed = start + 1
        for i in range(start + 1, min(start + block_len, T)):
            logits.append(runner.step(tokens[:, i : i + 1], own=runner.last_outputs[:, None]))
    np.testing.assert_allclose(np.stack(logits, axis=1), parallel, atol=1e-5)
    with pytest.raises(ValueError, match="feature-level"):
        runner.step(tokens[:, :1])


def test_feature_drafter_round_on_device_equals_step_by_step() -> None:
    """A greedy round on device (`draft_greedy`: the pending tokens with their states, then drafts fed back with
    the drafter's own outputs) drafts what host steps draft, and leaves the same cache lengths."""
    cfg = drafter_config(True, reads="features")
    params = drafter_model.init_params(cfg, seed=9)
    params = drafter_model.materialize(params.replace(embed=params.embed * 20.0), cfg)
    device = drafter_model.DrafterRunner(cfg, params, batch=3, max_len=64)
    host = drafter_model.DrafterRunner(cfg, params, batch=3, max_len=64)
    rng = np.random.default_rng(2)
    taps = (len(cfg.tapped_layers), cfg.primary_d_model)
    pending = [rng.integers(cfg.vocab_size, size=n).tolist() for n in (5, 1, 3)]
    feats = [rng.standard_normal((len(p), *taps)).astype(np.float32) for p in pending]
    rows = [2, 0, 1]
    got = device.draft_greedy(pending, rows, [4, 2, 3], [0.0] * 3, None, 0, hidden=feats)
    for b, row in enumerate(rows):
        want: list[int] = []
        logits = host.step(np.asarray([pending[b]]), rows=[row], features=feats[b][None])[0]
        while True:
            want.append(int(np.argmax(logits)))
            if len(want) == [4, 2, 3][b]:
                break
            logits = host.step(np.asarray([[want[-1]]]), rows=[row], own=host.last_outputs[:, None])[0]
        assert got[b] == want, b
    np.testing.assert_array_equal(device.lengths, host.lengths)
    with pytest.raises(ValueError, match="states at every pending"):
        device.draft_greedy([[1, 2]], [0], [1], [0.0], None, 0, hidden=[feats[1]])


def test_feature_drafter_saves_and_loads(tmp_path) -> None:
    cfg = drafter_config(True, reads="features", feature_layers=(TINY.n_layers, 1), head_vocab=24)
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=4), cfg)
    drafter_model.save_drafter(tmp_path, cfg, params)
    loaded_cfg, loaded = drafter_model.load_drafter(tmp_path)
    assert loaded_cfg == cfg and loaded_cfg.tapped_layers == (1, TINY.n_layers) and loaded_cfg.tap_index == (1, 0)
    tokens, hidden = _inputs(cfg)
    a, b = (drafter_model.train_forward(p, cfg, jnp.asarray(tokens), jnp.asarray(hidden), 2) for p in (params, loaded))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_vanilla_training_forward_equals_incremental() -> None:
    cfg = drafter_config(False)
    params = drafter_model.init_params(cfg, seed=3)
    tokens, _ = _inputs(cfg)
    parallel = np.asarray(drafter_model.train_forward(params, cfg, jnp.asarray(tokens), None, 2))
    runner = drafter_model.DrafterRunner(cfg, params, batch=2, max_len=64)
    first = runner.step(tokens[:, :4])  # a multi-token step (the engine's backlog) then single tokens
    rest = [runner.step(tokens[:, i : i + 1]) for i in range(4, T)]
    np.testing.assert_allclose(np.stack([first, *rest], axis=1), parallel[:, 3:], atol=1e-5)


def test_tandem_round_writes_its_states_in_the_drafting_call() -> None:
    """A Tandem round's primary states written by the drafting call itself (`draft_greedy(hidden=...)`: padded to a
    width of `INGEST_WIDTHS`, rows of different sizes, none, or too many for one call) leave the same drafts, lengths
    and cache as an `ingest` call of their own before drafting."""
    cfg = drafter_config(True)
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=4), cfg)
    fused = drafter_model.DrafterRunner(cfg, params, batch=4, max_len=64)
    apart = drafter_model.DrafterRunner(cfg, params, batch=4, max_len=64)
    rng = np.random.default_rng(1)
    rows = [3, 0, 2]
    taps = (len(cfg.tapped_layers), cfg.primary_d_model)
    for sizes in ((10, 0, 1), (2, 1, 0), (1, 5, 2), (0, 2, 9)):
        states = [rng.standard_normal((n, *taps)).astype(np.float32) if n else None for n in sizes]
        pending = [[int(t)] for t in rng.integers(cfg.vocab_size, size=len(rows))]
        for row, h in zip(rows, states, strict=True):
            if h is not None:
                apart.ingest(h[None], rows=[row])
        args = (pending, rows, [3, 1, 2], [0.0] * 3, None, 0)
        got, want = fused.draft_greedy(*args, hidden=states), apart.draft_greedy(*args)
        assert got == want
        np.testing.assert_array_equal(fused.lengths, apart.lengths)
        for a, b in zip(
            jax.tree.leaves((fused.cache.k, fused.cache.v)),
            jax.tree.leaves((apart.cache.k, apart.cache.v)),
            strict=True,
        ):
            for row in rows:
                n = min(int(fused.lengths[row]), a.shape[2])
                np.testing.assert_allclose(np.asarray(a[row, :, :n]), np.asarray(b[row, :, :n]), atol=1e-5)
        for row in rows:  # keep one draft, as a round that accepted it would
            fused.truncate(row, int(fused.lengths[row]) - 1)
            apart.truncate(row, int(apart.lengths[row]) - 1)
    assert fused.lengths[1] == 0  # other slots untouched
    with pytest.raises(ValueError, match="vanilla"):
        vcfg = drafter_config(False)
        vanilla = drafter_model.DrafterRunner(
            vcfg, drafter_model.materialize(drafter_model.init_params(vcfg), vcfg), batch=1
        )
        vanilla.draft_greedy([[1]], [0], [1], [0.0], None, 0, hidden=[None])


def test_quantized_drafter_runs_its_q8_weights() -> None:
    """`quantize` (the serving form) turns every product of a drafting round into Q8_0 blocks, leaves the embedding
    float, and its rounds equal the float path's on the same Q8_0-rounded weights: drafts, and logits to float32
    rounding (the kernel sums in another order than XLA)."""
    cfg = drafter_config(True, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, head_vocab=24)
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=6), cfg)
    quantized = drafter_model.quantize(params)
    products = [w for p in quantized.layers for w in (p.wqkv, p.wo, p.w_gate_up, p.w_down)]
    assert all(isinstance(w, kernels.QLinear) for w in [*products, *quantized.proj, quantized.head])
    assert not isinstance(quantized.embed, kernels.QLinear)
    want = kernels.dequantize(*kernels.quantize_q8(np.asarray(params.head)))
    np.testing.assert_array_equal(np.asarray(quantized.head.w), want)
    rounded = jax.tree.map(
        kernels.float_weight, quantized, is_leaf=lambda x: isinstance(x, kernels.QLinear)
    )  # the same Q8_0 weights, every product in XLA
    runners = [drafter_model.DrafterRunner(cfg, p, batch=2, max_len=64) for p in (quantized, rounded)]
    tokens, hidden = _inputs(cfg)
    logits = []
    for runner in runners:
        runner.ingest(hidden[:, :6])
        logits.append(runner.step(tokens[:, :3]))
        logits.append(np.asarray(runner.draft_greedy([[1], [2]], [0, 1], [3, 3], [0.0, 0.0], None, 0)))
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-4)
    np.testing.assert_array_equal(logits[1], logits[3])
    tiny = drafter_model.materialize(drafter_model.init_params(drafter_config(True)), drafter_config(True))
    assert not isinstance(drafter_model.quantize(tiny).layers[0].wqkv, kernels.QLinear)  # d = 16: the kernel takes 32


@pytest.mark.skipif(not kernels.available(), reason="the int8 kernel cannot run on this machine")
def test_int8_activation_drafter_is_batch_invariant() -> None:
    """With the primary's 8-bit activations (`quantize(int8_activations=True)`) every product of a round takes the
    dot form, whose 8-bit inputs are quantized per column: a row's logits and drafts are bitwise the same alone or
    beside another row, and stay near the float-input form's."""
    cfg = drafter_config(True, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, head_vocab=24)
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=6), cfg)
    dot = drafter_model.quantize(params, int8_activations=True)
    products = [w for p in dot.layers for w in (p.wqkv, p.wo, p.w_gate_up, p.w_down)]
    assert all(w.panels.dot for w in [*products, *dot.proj, dot.head])
    tokens, hidden = _inputs(cfg)
    pair = drafter_model.DrafterRunner(cfg, dot, batch=2, max_len=64)
    pair.ingest(hidden[:, :6])
    both = pair.step(tokens[:, :3])
    for row in (0, 1):
        alone = drafter_model.DrafterRunner(cfg, dot, batch=2, max_len=64)
        alone.ingest(hidden[row : row + 1, :6], rows=[row])
        np.testing.assert_array_equal(alone.step(tokens[row : row + 1, :3], rows=[row])[0], both[row])
    float_inputs = drafter_model.DrafterRunner(cfg, drafter_model.quantize(params), batch=2, max_len=64)
    float_inputs.ingest(hidden[:, :6])
    np.testing.assert_allclose(both, float_inputs.step(tokens[:, :3]), atol=0.1)


def test_tandem_reads_primary_states_and_vanilla_does_not() -> None:
    tcfg, vcfg = drafter_config(True), drafter_config(False)
    tokens, hidden = _inputs(tcfg)
    other = hidden[::-1]  # different primary states (a mere rescale would vanish in the RMSNorm)
    for cfg, should_change in ((tcfg, True), (vcfg, False)):
        params = drafter_model.init_params(cfg, seed=5)
        a = drafter_model.train_forward(
            params, cfg, jnp.asarray(tokens), jnp.asarray(hidden) if cfg.tandem else None, 2
        )
        b = drafter_model.train_forward(params, cfg, jnp.asarray(tokens), jnp.asarray(other) if cfg.tandem else None, 2)
        assert bool(jnp.any(jnp.abs(a - b) > 1e-4)) == should_change
        # Position 0 and 1 (the first round, b(i) = -1) never see primary states.
        np.testing.assert_allclose(np.asarray(a[:, :2]), np.asarray(b[:, :2]), atol=1e-6)


def test_layer_map() -> None:
    assert default_layer_map(4, 30) == (8, 15, 23, 30)
    cfg = drafter_config(True, layer_map=(4, 4))
    assert cfg.tapped_layers == (4,) and cfg.tap_index == (0, 0)
    with pytest.raises(ValueError, match="layer_map"):
        drafter_config(True, layer_map=(1, 9))
    assert drafter_config(False).tapped_layers == ()


@pytest.mark.parametrize(("tandem_mode", "dtype"), [(True, "float32"), (False, "float16")])
def test_save_load_round_trip(tmp_path, tandem_mode: bool, dtype: str) -> None:
    cfg = drafter_config(tandem_mode)
    params = drafter_model.init_params(cfg, seed=7)
    drafter_model.save_drafter(tmp_path, cfg, params, dtype=dtype)
    cfg2, params2 = drafter_model.load_drafter(tmp_path)
    assert cfg2 == cfg
    tol = 0 if dtype == "float32" else 1e-3
    assert jax.tree.structure(params2) == jax.tree.structure(params)  # every weight, layouts included
    for got, want in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol)
    assert (params2.proj is None) == (not tandem_mode)
    assert TINY.vocab_size == cfg2.vocab_size


# τ_first sits inside the tiny drafters' first-draft confidences (max probability near 0.03 with the full head, the
# random MLP router's near 0.46), so that rounds that decline and rounds that draft mix within one call.
@pytest.mark.parametrize(
    ("head_vocab", "tau", "tau_first", "trained_router"),
    [(0, 0.0, 0.0, False), (0, 0.3, 0.03, False), (24, 0.46, 0.466, True)],
)
def test_greedy_round_on_device_equals_step_by_step(
    head_vocab: int, tau: float, tau_first: float, trained_router: bool
) -> None:
    """`draft_greedy` (one call per round for every session) drafts exactly what the host loop of single steps drafts
    for each session alone, with sessions of different histories, backlogs and γ in the same call; a round whose
    first draft falls below τ_first drafts nothing, and its pending tokens are still fed."""
    cfg = dataclasses.replace(drafter_config(False), head_vocab=head_vocab)
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=3), cfg)
    rcfg = RouterConfig(top_k=2, d_embed=cfg.d_model, hidden=8)
    router = MLPRouter(rcfg, init_router(rcfg, seed=1), np.asarray(params.embed)) if trained_router else MaxProbRouter()
    device_router = router.device_params if isinstance(router, MLPRouter) else None
    fused = drafter_model.DrafterRunner(cfg, params, batch=4, max_len=64)
    stepped = drafter_model.DrafterRunner(cfg, params, batch=4, max_len=64)
    rng = np.random.default_rng(0)
    rows = [2, 0, 3]  # three sessions drafted together; slot 1 stays empty
    history = {row: rng.integers(0, cfg.vocab_size, size=9 + 3 * row).tolist() for row in rows}
    first_tau = SpecConfig(tau=tau, tau_first=tau_first).first_tau
    counts = []
    for gammas in ((1, 3, 6), (3, 6, 1), (6, 1, 3), (4, 4, 4), (5, 2, 3)):
        pending = [history[row][int(fused.lengths[row]) :] for row in rows]
        got = fused.draft_greedy(pending, rows, gammas, [tau] * 3, device_router, rcfg.top_k, [first_tau] * 3)
        for row, todo, gamma, drafts in zip(rows, pending, gammas, got, strict=True):
            logits = stepped.step(np.asarray([todo]), rows=[row])[0]
            want = []
            if speculates(router, logits, first_tau):
                want = [int(np.argmax(logits))]
                while keep_drafting(router, logits, len(want), gamma, tau):
                    logits = stepped.step(np.asarray([[want[-1]]]), rows=[row])[0]
                    want.append(int(np.argmax(logits)))
            assert drafts == want, (row, gamma, drafts, want)
            assert fused.lengths[row] == stepped.lengths[row] == len(history[row]) + max(len(want), 1) - 1
            history[row] += [*want[:1], int(rng.integers(cfg.vocab_size))]  # keep one draft, then a correction
            counts.append(len(want))
            fused.truncate(row, len(history[row]) - 1)
            stepped.truncate(row, len(history[row]) - 1)
    assert fused.lengths[1] == 0  # other slots untouched
    if first_tau > 0:  # the thresholds above make both kinds of round happen
        assert 0 in counts and max(counts) >= 1, counts
