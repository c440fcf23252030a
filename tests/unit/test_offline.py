"""Training on recorded states: a feature-level drafter learns the primary's answers, exports, and serves losslessly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, drafter_config

from tandem.config import SpecConfig
from tandem.decoding.engine import Engine
from tandem.decoding.lookup import LookupConfig
from tandem.model import drafter as drafter_model
from tandem.model.primary import LlamaParams, PrimaryRunner
from tandem.training import offline
from tandem.training.selfdistill import greedy_answers


def _corpus(params: LlamaParams, n: int = 24) -> offline.StatesCorpus:
    """The tiny primary's greedy answers to random prompts, with its states recorded while it wrote them."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY.vocab_size, size=int(k)).tolist() for k in rng.integers(3, 9, size=n)]
    runner = PrimaryRunner(TINY, params, taps=(1, TINY.n_layers), batch=4, max_len=64)
    tokens, states, answers, examples = [], [], [], []
    for i, answer, hidden in sorted(greedy_answers(runner, prompts, max_new=20, stop_ids=set(), record=True)):
        begin = sum(len(t) for t in tokens)
        tokens.append(np.asarray([*prompts[i], *answer]))
        states.append(hidden)
        answers.append(np.r_[np.zeros(len(prompts[i]), bool), np.ones(len(answer), bool)])
        examples.append((begin, begin + len(tokens[-1])))
    return offline.StatesCorpus(
        np.concatenate(tokens), np.concatenate(states), (1, TINY.n_layers), examples, np.concatenate(answers)
    )


@pytest.mark.slow
def test_feature_drafter_learns_exports_and_serves_losslessly(tiny_params: LlamaParams, tmp_path: Path) -> None:
    corpus = _corpus(tiny_params)
    cfg = offline.OfflineConfig(
        steps=60, batch_size=8, seq_len=32, depth=2, lr=3e-3, warmup=5, head_vocab=40, val_fraction=0.2
    )
    trainer = offline.OfflineTrainer(cfg, corpus, TINY, tiny_params)
    assert trainer.dcfg.features and trainer.dcfg.tapped_layers == (TINY.n_layers,)
    params, _ = trainer.init()
    before = trainer.evaluate(params)["acceptance_per_position"]
    seen = trainer.batch(0)
    loss_before = float(trainer._loss(params, seen)[0])
    assert trainer.run(tmp_path / "run", log=lambda _: None) == {"step": 60, "finished": True}
    assert float(trainer._loss(trainer.params, seen)[0]) < 0.5 * loss_before
    after = trainer.evaluate(trainer.params, LookupConfig(min_ngram=2))
    assert after["acceptance_per_position"][1] > before[1], (before, after)
    assert {"drafter@gamma=2", "lookup+drafter@gamma=1"} <= set(after)
    # resuming a finished run trains nothing more; other settings are refused
    assert trainer.run(tmp_path / "run", log=lambda _: None)["step"] == 60
    other = offline.OfflineTrainer(offline.OfflineConfig(steps=61, depth=2, seq_len=32), corpus, TINY, tiny_params)
    with pytest.raises(ValueError, match="other settings"):
        other.run(tmp_path / "run")

    trainer.export(tmp_path / "export")
    dcfg, loaded = drafter_model.load_drafter(tmp_path / "export", primary_embed=np.asarray(tiny_params.embed))
    assert dcfg == trainer.dcfg and dcfg.head_vocab == 40
    engine = Engine(
        PrimaryRunner(TINY, tiny_params, taps=dcfg.tapped_layers, max_len=128),
        drafter_model.DrafterRunner(dcfg, loaded, max_len=128),
    )
    kept = 0
    for b, e in trainer.val_examples:
        answer = int(np.argmax(corpus.answers[b:e]))
        prompt = corpus.tokens[b : b + answer].tolist()
        want = engine.generate(prompt, mode="primary", max_tokens=20)
        got = engine.generate(prompt, mode="tandem-speed", max_tokens=20, spec=SpecConfig(gamma_max=2, tau=0.0))
        assert got.token_ids == want.token_ids
        kept += got.stats.accepted_tokens
    assert kept > 0  # the trained drafter's drafts are kept in serving too


def test_several_fused_layers_start_as_the_top_one_alone(tiny_params: LlamaParams) -> None:
    """Fusing more recorded layers adds inputs that start at zero: the first loss is the top layer's alone."""
    corpus = _corpus(tiny_params, n=8)
    base = offline.OfflineConfig(steps=10, batch_size=4, seq_len=32, depth=2, head_vocab=40, val_fraction=0.25)
    top = offline.OfflineTrainer(base, corpus, TINY, tiny_params)
    both = offline.OfflineTrainer(
        offline.OfflineConfig(**{**base.__dict__, "feature_layers": (TINY.n_layers, 1)}), corpus, TINY, tiny_params
    )
    assert both.dcfg.tapped_layers == (1, TINY.n_layers)
    batch = top.batch(0)
    loss_top, loss_both = (float(t._loss(t.init()[0], batch)[0]) for t in (top, both))
    assert loss_both == pytest.approx(loss_top, rel=1e-5)
    with pytest.raises(ValueError, match="not recorded"):
        offline.OfflineTrainer(
            offline.OfflineConfig(**{**base.__dict__, "feature_layers": (2,)}), corpus, TINY, tiny_params
        )


def test_layer_map_drafter_fine_tunes_from_its_stored_weights(tiny_params: LlamaParams, tmp_path: Path) -> None:
    """`init_from` a stored layer-map Tandem drafter: it starts from those weights and head, its depth s at i is the
    round that began at i - s, and training lowers the loss."""
    corpus = _corpus(tiny_params, n=12)
    dcfg = drafter_config(True, shared_embed=True, layer_map=(1, TINY.n_layers), head_vocab=40)
    stored = drafter_model.init_params(dcfg, seed=3)
    drafter_model.save_drafter(tmp_path / "start", dcfg, stored)
    cfg = offline.OfflineConfig(
        steps=30,
        batch_size=4,
        seq_len=32,
        depth=2,
        lr=3e-3,
        warmup=3,
        val_fraction=0.25,
        init_from=str(tmp_path / "start"),
    )
    trainer = offline.OfflineTrainer(cfg, corpus, TINY, tiny_params)
    assert trainer.dcfg == dcfg and trainer.head_ids.tolist() == np.asarray(stored.head_ids).tolist()
    params, _ = trainer.init()
    batch = trainer.batch(0)
    outs = trainer._depth_outputs(params, batch)
    runnable = drafter_model.materialize(params, dcfg, trainer.embed)
    hidden = batch["states"][:, :, trainer.feature_taps]
    for s in range(2):
        for i in (5, 6):  # depth s at i: the round that began at i - s, whose phase is (i - s) % 2
            whole = drafter_model.train_outputs(runnable, dcfg, batch["tokens"], hidden, 2, (i - s) % 2)
            t = batch["tokens"].shape[1]
            np.testing.assert_allclose(outs[s][:, i::t], whole[:, i::t], rtol=1e-5, atol=1e-5)
    loss_before = float(trainer._loss(params, batch)[0])
    assert trainer.run(tmp_path / "run", log=lambda _: None)["finished"]
    assert float(trainer._loss(trainer.params, batch)[0]) < loss_before
    with pytest.raises(ValueError, match="another kind"):
        offline.OfflineTrainer(offline.OfflineConfig(**{**cfg.__dict__, "kind": "vanilla"}), corpus, TINY, tiny_params)
