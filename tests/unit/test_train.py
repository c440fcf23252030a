"""Drafter training, export and evaluation on tiny models: resumable, pickle-free, and the SPEED simulation is exact."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, drafter_config

from tandem.config import SpecConfig
from tandem.decoding.engine import Engine
from tandem.model import drafter as drafter_model
from tandem.model.primary import LlamaParams
from tandem.training.evaluate import (
    Drafter,
    EvalConfig,
    RoundCosts,
    SpeedStats,
    acceptance_lengths,
    evaluate,
    greedy_continuations,
    round_predictions,
    simulate_greedy_speed,
)
from tandem.training.train import (
    TrainConfig,
    Trainer,
    batch_at,
    export_drafters,
    head_ids_by_frequency,
    load_checkpoint,
)
from tandem.training.tuning import TuneConfig, rank_settings

CFG = TrainConfig(steps=12, batch_size=4, seq_len=24, lr=3e-3, warmup=2, checkpoint_every=4, distil_from=0.5)


def _data(n: int = 4000) -> np.ndarray:
    """A learnable token stream: mostly t+1 after t, some noise."""
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.integers(1, 3, size=n)) % TINY.vocab_size
    return x.astype(np.uint16)


def _dcfgs() -> dict:
    return {
        "tandem": drafter_config(True, shared_embed=True),
        "tandem-ce": drafter_config(True, shared_embed=True),
        "vanilla": drafter_config(False, shared_embed=True),
    }


@pytest.fixture(scope="module")
def trained(tiny_params: LlamaParams, tmp_path_factory) -> tuple[Trainer, Path]:
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(TINY, tiny_params, _dcfgs(), CFG)
    trainer.run(_data(), out, progress=False)
    return trainer, out


def test_training_lowers_the_loss_of_every_drafter(trained) -> None:
    _, out = trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(CFG.steps))
    for name in ("tandem", "tandem-ce", "vanilla"):
        assert log[-1][name]["ce"] < log[0][name]["ce"] - 0.5, name


def test_stage_two_distils_only_the_distilled_drafters(trained) -> None:
    trainer, _ = trained
    assert trainer.distil_weights(0) == {"tandem": 0.0, "tandem-ce": 0.0, "vanilla": 0.0}
    assert trainer.distil_weights(CFG.steps - 1) == {"tandem": 0.5, "tandem-ce": 0.0, "vanilla": 0.5}


def test_resumed_run_equals_uninterrupted_run(trained, tiny_params: LlamaParams, tmp_path: Path) -> None:
    trainer, out = trained
    Trainer(TINY, tiny_params, _dcfgs(), CFG).run(_data(), tmp_path, max_minutes=0, progress=False)
    assert json.loads((tmp_path / "trainer.json").read_text())["step"] == 1  # out of time after one step
    resumed = Trainer(TINY, tiny_params, _dcfgs(), CFG).run(_data(), tmp_path, progress=False)
    straight = load_checkpoint(out, trainer)
    assert resumed.step == straight.step == CFG.steps
    for name in straight.params:
        np.testing.assert_allclose(
            np.asarray(resumed.params[name].layers[0].wqkv), np.asarray(straight.params[name].layers[0].wqkv), atol=1e-5
        )
    assert not any(p.suffix == ".pkl" for p in tmp_path.rglob("*"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(CFG.steps))  # one log line per step across the interruption


def test_checkpoint_of_another_shape_or_schedule_is_refused(trained, tiny_params: LlamaParams) -> None:
    _, out = trained
    other = {n: dataclasses.replace(c, ffn_dim=48) for n, c in _dcfgs().items()}
    with pytest.raises(ValueError, match="differs"):
        load_checkpoint(out, Trainer(TINY, tiny_params, other, CFG))
    with pytest.raises(ValueError, match=r"other settings \(steps\)"):
        load_checkpoint(out, Trainer(TINY, tiny_params, _dcfgs(), dataclasses.replace(CFG, steps=99)))
    assert [p.name for p in out.glob("step-*")] == [f"step-{CFG.steps:06d}"]  # only the latest is kept


def test_batches_are_deterministic_per_step() -> None:
    data = _data()
    np.testing.assert_array_equal(batch_at(data, 3, CFG), batch_at(data, 3, CFG))
    assert not np.array_equal(batch_at(data, 3, CFG), batch_at(data, 4, CFG))
    assert batch_at(data, 0, CFG).shape == (CFG.batch_size, CFG.seq_len + 1)


def test_head_ids_by_frequency() -> None:
    counts = np.array([5, 0, 9, 1, 7])
    np.testing.assert_array_equal(head_ids_by_frequency(counts, 2), [2, 4])
    np.testing.assert_array_equal(head_ids_by_frequency(counts, 3, always=(1,)), [1, 2, 4])


@pytest.mark.slow
def test_export_reloads_with_restricted_head_and_router(trained, tiny_params: LlamaParams, tmp_path: Path) -> None:
    trainer, out = trained
    state = load_checkpoint(out, trainer)
    head = np.arange(0, TINY.vocab_size, 2, dtype=np.int32)
    windows = batch_at(_data(), 99, CFG)
    report = export_drafters(
        state, trainer.dcfgs, TINY, tiny_params, tmp_path, head_ids=head, router_windows=windows, router_steps=50
    )
    assert set(report) == {"tandem", "tandem-ce", "vanilla"}
    cfg, params = drafter_model.load_drafter(tmp_path / "tandem", primary_embed=tiny_params.embed)
    assert cfg.shared_embed and cfg.head_vocab == head.size and params.head is not None
    runner = drafter_model.DrafterRunner(cfg, params, max_len=32)
    logits = runner.step(np.array([[3, 4, 5]]))[0]
    assert np.all(logits[1::2] <= -1e29) and np.all(logits[::2] > -1e29)  # only head tokens can be drafted
    with pytest.raises(ValueError, match="primary's embedding"):
        drafter_model.load_drafter(tmp_path / "tandem")
    # Fine-tuning (--init-from) starts from exactly the exported weights, as trainable parameters.
    start = trainer.init_state(init_from=tmp_path)
    tuned = start.params["tandem"]
    assert tuned.embed is None and tuned.head_ids is None and tuned.embed_proj is not None
    np.testing.assert_array_equal(np.asarray(tuned.layers[0].wqkv), np.asarray(params.layers[0].wqkv))
    other = {n: dataclasses.replace(c, ffn_dim=2 * c.ffn_dim) for n, c in trainer.dcfgs.items()}
    with pytest.raises(ValueError, match="another shape"):
        Trainer(TINY, tiny_params, other, CFG).init_state(init_from=tmp_path)


def _engine_drafters(engine: Engine) -> dict[str, Drafter]:
    out = {}
    for name, mode in (("tandem", "tandem-speed"), ("vanilla", "speed")):
        worker = engine.drafters[mode]
        assert worker is not None
        out[name] = Drafter(worker.runner.cfg, worker.runner.params)
    return out


# The replay models the drafter's rounds: prompt lookup off.
@pytest.mark.parametrize("spec", [SpecConfig(gamma_max=2, tau=0.0, lookup_ngram=0),
                                  SpecConfig(gamma_max=5, tau=0.0, lookup_ngram=0),
                                  SpecConfig(gamma_max=8, tau=0.5, tau_first=0.0, lookup_ngram=0),
                                  SpecConfig(gamma_max=4, tau=0.001, tau_first=0.9, lookup_ngram=0)])  # fmt: skip
def test_speed_simulation_equals_the_engine(tiny_engine: Engine, tiny_params: LlamaParams, spec: SpecConfig) -> None:
    """The evaluation's exact greedy-SPEED replay gives the engine's rounds and accepted tokens, prompt by prompt."""
    prompts = np.random.default_rng(1).integers(0, TINY.vocab_size, size=(5, 6)).astype(np.int32)
    seqs, lengths = greedy_continuations(TINY, tiny_params, prompts, 30)
    accepted_any = 0
    for name, d in _engine_drafters(tiny_engine).items():
        preds, conf = round_predictions(TINY, tiny_params, d, seqs, 8, 4)
        mode = "tandem-speed" if name == "tandem" else "speed"
        for row in range(prompts.shape[0]):
            got = tiny_engine.generate(prompts[row].tolist(), mode=mode, max_tokens=30, spec=spec)
            assert got.token_ids == seqs[row, 6:].tolist()
            sim = simulate_greedy_speed(
                preds[row], conf[row], seqs[row], 6, int(lengths[row]), spec.gamma_max, spec.tau, spec.first_tau
            )
            want = (got.stats.rounds, got.stats.accepted_tokens, got.stats.declined_rounds)
            assert (sim.rounds, sim.accepted, sim.declined) == want, (name, row)
            accepted_any += sim.accepted
    assert accepted_any > 0


def test_round_costs_price_rounds_and_declines() -> None:
    """Two rounds (verify 2 and 3 tokens, 3 drafts, 3 accepted) and one declined round: 6 tokens for
    1.3 + 1.3 + 1.0 + 0.1 x (3 + 1) = 4.0 one-token steps."""
    stats = SpeedStats(rounds=2, drafted=3, accepted=3, declined=1)
    stats.blocks.update({2: 1, 3: 1})
    costs = RoundCosts(verify=(1.0, 1.3, 1.3), drafter_step=0.1)
    assert costs.relative_speed(stats) == pytest.approx(1.5)
    assert costs.block(9) == 1.3  # past the measured curve: its last entry
    assert RoundCosts((1.0,), 0.0).relative_speed(SpeedStats(declined=4)) == 1.0  # declining always = the primary


def test_settings_are_ranked_by_the_cost_model(tiny_engine: Engine, tiny_params: LlamaParams) -> None:
    prompts = np.random.default_rng(2).integers(0, TINY.vocab_size, size=(3, 5)).astype(np.int32)
    seqs, lengths = greedy_continuations(TINY, tiny_params, prompts, 20)
    d = _engine_drafters(tiny_engine)["tandem"]
    preds, conf = round_predictions(TINY, tiny_params, d, seqs, 4, 2)
    cfg = TuneConfig(tau_firsts=(0.0, 0.9), taus=(0.001, 0.5), gammas=(1, 4))
    costs = RoundCosts(verify=(1.0, 1.3, 1.3, 1.3, 1.5), drafter_step=0.1)
    starts = [5] * 3
    ranked = rank_settings(preds, conf, seqs, starts, lengths.tolist(), costs, cfg)
    assert len(ranked) == 8
    speeds = [r["relative_speed"] for r in ranked]
    assert speeds == sorted(speeds, reverse=True)
    pick = next(r for r in ranked if (r["tau_first"], r["tau"], r["gamma_max"]) == (0.9, 0.001, 4))
    total = SpeedStats()
    for b in range(3):
        total.add(simulate_greedy_speed(preds[b], conf[b], seqs[b], 5, int(lengths[b]), 4, 0.001, 0.9))
    assert pick["relative_speed"] == pytest.approx(costs.relative_speed(total)) and pick["declined"] == total.declined


@pytest.mark.slow
def test_evaluate_reports_every_figure(tiny_engine: Engine, tiny_params: LlamaParams) -> None:
    drafters = _engine_drafters(tiny_engine)
    cfg = EvalConfig(seq_len=16, windows=4, prompts=3, prompt_len=5, max_new=12, gammas=(2, 4), gamma_max=6, batch=2)
    tokens = _data(400).astype(np.int32)
    res = evaluate(TINY, tiny_params, drafters, tokens, cfg)
    for name in drafters:
        m = res["models"][name]
        assert 0 <= m["accuracy"] <= 100 and 0 <= m["agreement"] <= 100 and 0 <= m["tv"] <= 1 and m["ce"] > 0
        assert set(res["acceptance"][name]) >= {"gamma_2", "gamma_4", "adaptive"}
        assert res["acceptance"][name]["gamma_4"] >= 1.0
    direct = acceptance_lengths(TINY, tiny_params, drafters, np.asarray(tokens[:15]).reshape(3, 5), cfg)
    assert direct["tandem"]["gamma_2_rounds"] > 0
    json.dumps(res)  # the eval JSON is serialisable


def test_materialize_shared_embedding() -> None:
    cfg = drafter_config(True, shared_embed=True)
    params = drafter_model.init_params(cfg, 0)
    assert params.embed is None and params.embed_proj is not None
    with pytest.raises(ValueError, match="materialize"):
        drafter_model.DrafterRunner(cfg, params)
    primary_embed = jnp.ones((TINY.vocab_size, TINY.d_model))
    runnable = drafter_model.materialize(params, cfg, primary_embed)
    assert runnable.embed is not None
    np.testing.assert_allclose(np.asarray(runnable.embed), np.asarray(primary_embed @ params.embed_proj), rtol=1e-5)


def test_router_serves_what_it_was_trained_as(tmp_path: Path) -> None:
    """NumPy features + MLP (serving) equal the JAX ones (training and evaluation); a saved router reloads."""
    from tandem.model.router import (
        MLPRouter,
        RouterConfig,
        features,
        load_router,
        router_logit,
        save_router,
        train_router,
    )

    rng = np.random.default_rng(0)
    embed = rng.standard_normal((TINY.vocab_size, 8)).astype(np.float32)
    logits = rng.standard_normal((64, TINY.vocab_size)).astype(np.float32) * 3
    logits[:, ::3] = -1e30  # a restricted head: masked tokens get probability 0
    cfg = RouterConfig(top_k=3, d_embed=8, hidden=16)
    feats = np.asarray(features(jnp.asarray(logits), jnp.asarray(embed), cfg.top_k))
    np.testing.assert_allclose(
        features(logits.astype(np.float64), embed, cfg.top_k, xp=np), feats, rtol=1e-4, atol=1e-5
    )
    agree = feats[:, 1]  # learnable target: the top probability
    params, fit = train_router(feats, agree, cfg, steps=300, batch=64)
    assert fit["mae"] < 0.1
    save_router(tmp_path, cfg, params)
    stored = load_router(tmp_path)
    assert stored is not None and stored[0] == cfg
    router = MLPRouter(*stored, embed)
    want = 1 / (1 + np.exp(-np.asarray(router_logit(params, jnp.asarray(feats)))))
    got = np.array([router.confidence(row) for row in logits])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert load_router(tmp_path / "missing") is None
