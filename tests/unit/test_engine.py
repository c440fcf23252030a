"""The in-process engine: greedy SPEED is lossless, sampled SPEED is distributed like the primary's own sampling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, drafter_config, make_engine, tiny_state
from scipy import stats

from tandem.config import DrafterConfig, LlamaConfig, SamplingParams, SpecConfig
from tandem.decoding.engine import Engine
from tandem.decoding.rounds import GenerationStats
from tandem.decoding.speculative import SparseDist, target_probs
from tandem.decoding.workers import DrafterWorker
from tandem.model import drafter as drafter_model
from tandem.model.primary import PrimaryRunner, params_from_state_dict

PROMPTS = [list(np.random.default_rng(i).integers(0, TINY.vocab_size, size=3 + i % 7)) for i in range(20)]


@pytest.mark.parametrize(
    "spec",
    [
        SpecConfig(gamma_max=1, tau=0.0),
        SpecConfig(gamma_max=4, tau=0.0),
        SpecConfig(gamma_max=7, tau=0.8, tau_first=0.0),
        # τ_first inside the tiny drafters' first-draft confidences (mostly above 0.9): declined rounds (one-token
        # primary steps) interleave with drafting ones.
        SpecConfig(gamma_max=4, tau=0.001, tau_first=0.9),
        # Pauses (primary-only steps, the drafter told of them with the next round) after most rounds: the random
        # drafters keep far fewer than 3 of 4 drafts on average.
        SpecConfig(gamma_max=4, tau=0.0, min_accepted=3.0, pause_steps=3),
    ],
)
def test_greedy_speculation_is_lossless(tiny_engine: Engine, spec: SpecConfig) -> None:
    rounds = declined = paused = 0
    for prompt in PROMPTS:
        want = tiny_engine.generate(prompt, mode="primary", max_tokens=64)
        assert len(want.token_ids) == 64 and want.finish_reason == "length"
        for mode in ("speed", "tandem-speed"):
            got = tiny_engine.generate(prompt, mode=mode, max_tokens=64, spec=spec)
            assert got.token_ids == want.token_ids, (mode, prompt)
            assert got.stats.rounds <= got.stats.drafted_tokens <= spec.gamma_max * got.stats.rounds
            assert got.stats.drafter_calls == got.stats.rounds + got.stats.declined_rounds
            rounds += got.stats.rounds
            declined += got.stats.declined_rounds
            paused += got.stats.paused_steps
    assert rounds > 0 and (declined > 0) == (spec.first_tau > 0) and (paused > 0) == (spec.min_accepted > 0)


@pytest.fixture(scope="module")
def feature_engine(tiny_params) -> Engine:
    return make_engine(tiny_params, reads="features", slots=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        SpecConfig(gamma_max=1, tau=0.0),
        SpecConfig(gamma_max=4, tau=0.0),
        SpecConfig(gamma_max=4, tau=0.001, tau_first=0.9),
        SpecConfig(gamma_max=4, tau=0.0, min_accepted=3.0, pause_steps=3),
    ],
)
def test_feature_level_drafter_is_lossless(feature_engine: Engine, spec: SpecConfig) -> None:
    """A Tandem drafter of the feature-level form (the primary's states at the previous position fused into its
    input, its own outputs inside a round) leaves greedy output the primary's own, rounds, declines and pauses alike,
    and sampled rounds (drafted on the host) run through the same session bookkeeping."""
    rounds = 0
    for prompt in PROMPTS[:10]:
        want = feature_engine.generate(prompt, mode="primary", max_tokens=48)
        got = feature_engine.generate(prompt, mode="tandem-speed", max_tokens=48, spec=spec)
        assert got.token_ids == want.token_ids, prompt
        rounds += got.stats.rounds + got.stats.declined_rounds
        sampling = SamplingParams(temperature=1.0, seed=len(prompt))
        a = feature_engine.generate(prompt, mode="tandem-speed", max_tokens=24, sampling=sampling, spec=spec)
        b = feature_engine.generate(prompt, mode="tandem-speed", max_tokens=24, sampling=sampling, spec=spec)
        assert a.token_ids == b.token_ids
    assert rounds > 0


def _spy_on_resumed_rounds(worker: DrafterWorker) -> list[tuple[int, int, SparseDist]]:
    """Records (t_0, max drafts, q_1) of every round the worker drafts after a pause, until `del worker.advance`."""
    resumed: list[tuple[int, int, SparseDist]] = []
    advance = worker.advance

    def spy(session, accepted, hidden, next_token, max_drafts, skipped=()):
        drafts = advance(session, accepted, hidden, next_token, max_drafts, skipped)
        if skipped:
            resumed.append((next_token, max_drafts, drafts.proposals[0]))
        return drafts

    worker.advance = spy  # type: ignore[method-assign]
    return resumed


@pytest.mark.slow
def test_a_paused_drafter_catches_up_exactly(tiny_params) -> None:
    """The first round after a pause proposes what a fresh session started on the whole sequence so far proposes: the
    skipped tokens (and, Tandem, their primary states) reach the drafter's cache as if it had seen every step.
    Sampled requests, for varied tokens; the first draft's proposal q_1 depends on the drafter's cache alone."""
    engine = make_engine(tiny_params, slots=2)
    spec = SpecConfig(gamma_max=3, tau=0.0, min_accepted=3.0, pause_steps=2, lookup_ngram=0)  # the model's rounds
    for mode in ("speed", "tandem-speed"):
        worker = engine.drafters[mode]
        resumed = _spy_on_resumed_rounds(worker)
        checks = []  # (the sequence before t_0, t_0, max drafts, q_1)
        for i, prompt in enumerate(PROMPTS[:4]):
            sampling = SamplingParams(temperature=1.0, seed=i)
            emitted: list[int] = []
            for chunk in engine.stream(prompt, mode=mode, max_tokens=48, sampling=sampling, spec=spec):
                checks += [([*prompt, *emitted[:-1]], *r) for r in resumed]  # rounds drafted after `emitted`
                resumed.clear()
                emitted += chunk
        del worker.advance
        assert len(checks) >= 4 and len({c[1] for c in checks}) > 1, mode
        for before, t0, max_drafts, q in checks[:6]:
            hidden = None
            if worker.tandem:  # the primary's states of every position before t_0
                hidden = engine.primary_worker.prefill("states", before, SamplingParams(), True).hidden
                engine.primary_worker.release("states")
            fresh = worker.open("fresh", SamplingParams(temperature=1.0), spec)
            try:
                want = fresh.start(before, hidden, t0, max_drafts).proposals[0]
            finally:
                fresh.close()
            # The same distribution up to float rounding (a fresh start runs the prefix as one block), which may swap
            # near-tied tokens at the top-K's edge.
            got_p, want_p = (
                dict(zip(q.ids.tolist(), q.probs, strict=True)),
                dict(zip(want.ids.tolist(), want.probs, strict=True)),
            )
            common = got_p.keys() & want_p.keys()
            assert len(common) >= len(want_p) - 2, mode
            np.testing.assert_allclose([got_p[t] for t in common], [want_p[t] for t in common], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_oracle_drafter_accepts_everything(tiny_params) -> None:
    """A vanilla drafter holding the primary's own weights agrees at every position: every round is fully accepted
    and ends with the primary's bonus token, and the drafter's backlog (last draft + bonus) is fed the next round."""
    cfg = DrafterConfig(
        vocab_size=TINY.vocab_size, d_model=TINY.d_model, n_layers=TINY.n_layers, n_heads=TINY.n_heads,
        n_kv_heads=TINY.n_kv_heads, head_dim=TINY.head_dim, ffn_dim=TINY.ffn_dim, rope_theta=TINY.rope_theta,
        rms_eps=TINY.rms_eps, tandem=False, primary_d_model=TINY.d_model, primary_n_layers=TINY.n_layers,
    )  # fmt: skip
    oracle = drafter_model.DrafterParams(
        embed=tiny_params.embed, layers=tiny_params.layers, final_norm=tiny_params.final_norm, proj=None
    )
    engine = Engine(PrimaryRunner(TINY, tiny_params, max_len=256), None, drafter_model.DrafterRunner(cfg, oracle))
    for prompt in PROMPTS[:5]:
        want = engine.generate(prompt, mode="primary", max_tokens=40)
        got = engine.generate(
            prompt, mode="speed", max_tokens=40, spec=SpecConfig(gamma_max=5, tau=0.0, lookup_ngram=0)
        )
        assert got.token_ids == want.token_ids
        assert got.stats.accepted_tokens == got.stats.drafted_tokens
        assert got.stats.accepted_per_position[:5] == got.stats.drafted_per_position[:5]
        assert got.stats.mean_acceptance_length > 5.0  # rounds of 5 drafts + bonus (the last round may be shorter)


def test_standalone_tandem_keeps_drafts(tiny_engine: Engine) -> None:
    spec = SpecConfig(gamma_max=3, tau=0.0)
    res = tiny_engine.generate(PROMPTS[0], mode="tandem", max_tokens=33, spec=spec)
    assert len(res.token_ids) == 33
    assert res.stats.accepted_tokens == res.stats.drafted_tokens  # nothing is verified away
    # 1 prefill token, then rounds of 3 drafts + the primary's free token
    assert res.stats.rounds == 8 and res.stats.primary_calls == 9


def test_stop_tokens_and_limits(tiny_params) -> None:
    engine = make_engine(tiny_params)
    free = engine.generate(PROMPTS[1], mode="primary", max_tokens=20).token_ids
    stop = free[5]
    engine.stop_token_ids = frozenset({stop})
    first = free.index(stop)
    for mode in ("primary", "speed", "tandem-speed"):
        res = engine.generate(PROMPTS[1], mode=mode, max_tokens=20, spec=SpecConfig(gamma_max=4, tau=0.0))
        assert res.finish_reason == "stop" and res.token_ids == free[:first], mode
    engine.stop_token_ids = frozenset()
    assert len(engine.generate(PROMPTS[1], mode="tandem-speed", max_tokens=1).token_ids) == 1


def test_bad_requests(tiny_engine: Engine) -> None:
    for kwargs, message in (
        (dict(prompt_ids=[1], mode="turbo"), "unknown mode"),
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=[1], max_tokens=0), "max_tokens"),
        (dict(prompt_ids=[TINY.vocab_size]), "token ids"),
        (dict(prompt_ids=[1] * 300), "no room"),
    ):
        with pytest.raises(ValueError, match=message):
            tiny_engine.generate(**kwargs)
    assert len(tiny_engine.generate([1, 2], max_tokens=4).token_ids) == 4  # still serving


def test_seeded_sampling_is_reproducible(tiny_engine: Engine) -> None:
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    for mode in ("primary", "speed", "tandem-speed"):
        a = tiny_engine.generate(PROMPTS[2], mode=mode, max_tokens=30, sampling=sampling).token_ids
        b = tiny_engine.generate(PROMPTS[2], mode=mode, max_tokens=30, sampling=sampling).token_ids
        assert a == b, mode


# --- sampled SPEED against the primary's exact distribution on a 8-token vocabulary ---

SMALL = LlamaConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32)
SAMPLING = SamplingParams(temperature=3.0, top_k=6, top_p=0.95)  # sequences under 5 expected counts are pooled
N_SAMPLES = 12_000


def _exact_joint(params, prompt: list[int]) -> np.ndarray:
    """P(t1, t2, t3 | prompt) under the request's processing, from the primary's own logits: [8, 8, 8]."""
    v = SMALL.vocab_size
    runner = PrimaryRunner(SMALL, params, batch=v * v, max_len=16)
    grid = np.stack(np.meshgrid(np.arange(v), np.arange(v), indexing="ij"), -1).reshape(-1, 2)  # [64, 2]: (t1, t2)
    seqs = np.concatenate([np.tile(prompt, (v * v, 1)), grid], axis=1)
    probs = target_probs(runner.forward(seqs).logits, SAMPLING)  # [64, P + 2, V]
    p = len(prompt)
    p1 = probs[0, p - 1]  # [V]
    p2 = probs[::v, p].reshape(v, v)  # row t1 -> P(t2 | t1)
    p3 = probs[:, p + 1].reshape(v, v, v)  # (t1, t2) -> P(t3 | t1, t2)
    return p1[:, None, None] * p2[:, :, None] * p3


def _sample_counts(
    engine: Engine, prompt: list[int], mode: str, n: int, spec: SpecConfig
) -> tuple[np.ndarray, GenerationStats]:
    """Counts of each sampled 3-token continuation over seeds 0..n-1, and the speculation counters summed."""
    counts = np.zeros((8, 8, 8))
    total = GenerationStats()
    for seed in range(n):
        sampling = SamplingParams(SAMPLING.temperature, SAMPLING.top_k, SAMPLING.top_p, seed=seed)
        result = engine.generate(prompt, mode=mode, max_tokens=3, sampling=sampling, spec=spec)
        counts[tuple(result.token_ids)] += 1
        total.rounds += result.stats.rounds
        total.declined_rounds += result.stats.declined_rounds
    return counts, total


def _gof_pvalue(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square goodness of fit, pooling cells expected below 5 counts into one; 0 if an impossible cell was hit."""
    expected = expected_probs.ravel() * counts.sum()
    observed = counts.ravel()
    if observed[expected == 0].sum() > 0:  # a sequence the primary gives probability 0
        return 0.0
    observed, expected = observed[expected > 0], expected[expected > 0]
    small = expected < 5
    exp, obs = expected[~small], observed[~small]
    if small.any():
        exp, obs = np.append(exp, expected[small].sum()), np.append(obs, observed[small].sum())
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "prompt", "reads"),
    [
        # q covers 3 of 8 tokens: the residual path is exercised.
        (SpecConfig(gamma_max=2, tau=0.0, draft_top_k=3, lookup_ngram=0), [1, 5, 2], "layers"),
        # The router declines about a third of the rounds (τ_first): those are plain sampled primary steps.
        (SpecConfig(gamma_max=2, tau=0.3, tau_first=0.17, draft_top_k=3, lookup_ngram=0), [1, 5, 2], "layers"),
        # Prompt lookup from 1-grams on a prompt holding every token: every round's drafts are looked up, each
        # proposed as a point mass (accepted with probability p(d), else a draw from p without d).
        (SpecConfig(gamma_max=2, tau=0.0, draft_top_k=3, lookup_ngram=1), [1, 5, 2, 7, 3, 0, 4, 6], "layers"),
        # The feature-level drafter's rounds (drafted on the host when sampled, its own outputs fed back).
        (SpecConfig(gamma_max=2, tau=0.0, draft_top_k=3, lookup_ngram=0), [1, 5, 2], "features"),
    ],
    ids=["every-round-drafts", "some-rounds-declined", "prompt-lookup", "feature-level"],
)
def test_sampled_speculation_matches_primary_distribution(spec: SpecConfig, prompt: list[int], reads: str) -> None:
    params = params_from_state_dict(SMALL, tiny_state(SMALL, seed=3))
    tcfg, vcfg = drafter_config(True, SMALL, reads=reads), drafter_config(False, SMALL)
    engine = Engine(
        PrimaryRunner(SMALL, params, taps=tcfg.tapped_layers, max_len=32),
        drafter_model.DrafterRunner(tcfg, drafter_model.init_params(tcfg, 1), max_len=32),
        drafter_model.DrafterRunner(vcfg, drafter_model.init_params(vcfg, 2), max_len=32),
    )
    joint = _exact_joint(params, prompt)
    counts, counters = _sample_counts(engine, prompt, "tandem-speed", N_SAMPLES, spec)
    pvalue = _gof_pvalue(counts, joint)
    assert pvalue > 1e-3, pvalue
    assert counters.rounds > 0 and (counters.declined_rounds > 0) == (spec.first_tau > 0), counters
    worker = engine.drafters["tandem-speed"]
    assert worker is not None and (worker.lookup_rounds == counters.rounds) == (spec.lookup_ngram > 0)
    if spec.first_tau == 0 and not spec.lookup_ngram:
        # The test has teeth: standalone Tandem (drafts kept unverified) is not distributed like the primary.
        wrong, _ = _sample_counts(engine, prompt, "tandem", 2_000, spec)
        assert _gof_pvalue(wrong, joint) < 1e-6
