"""Speculative math on hand-made distributions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tandem.config import SamplingParams
from tandem.decoding.speculative import (
    MaxProbRouter,
    SparseDist,
    keep_drafting,
    make_rng,
    proposal,
    sample,
    target_probs,
    truncate_top_k,
    verify_greedy,
    verify_sampled,
)


def test_target_probs_truncation() -> None:
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    np.testing.assert_allclose(target_probs(logits, SamplingParams(temperature=1.0)), [0.5, 0.2, 0.15, 0.1, 0.05])
    np.testing.assert_allclose(target_probs(logits, SamplingParams(temperature=1.0, top_k=2)), [5 / 7, 2 / 7, 0, 0, 0])
    # top_p = 0.65: 0.5 alone is short of it, 0.5 + 0.2 reaches it -> keep two tokens; 0.75 needs a third
    np.testing.assert_allclose(
        target_probs(logits, SamplingParams(temperature=1.0, top_p=0.65)), [5 / 7, 2 / 7, 0, 0, 0]
    )
    three = np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85
    np.testing.assert_allclose(target_probs(logits, SamplingParams(temperature=1.0, top_p=0.75)), three)
    np.testing.assert_array_equal(target_probs(logits, SamplingParams()), [1, 0, 0, 0, 0])
    hot = target_probs(logits, SamplingParams(temperature=2.0))
    np.testing.assert_allclose(hot, np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05]) / np.sqrt([0.5, 0.2, 0.15, 0.1, 0.05]).sum())


def test_sampling_params_validation() -> None:
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_verify_greedy() -> None:
    target = np.eye(6)[[3, 4, 5, 0]] * 10  # argmax after t0, d1, d2, d3: 3, 4, 5, 0
    assert verify_greedy([3, 4, 5], target.argmax(-1)).__dict__ == {"accepted": 3, "next_token": 0}  # bonus
    assert verify_greedy([3, 1, 5], target.argmax(-1)).__dict__ == {"accepted": 1, "next_token": 4}  # correction
    assert verify_greedy([2], target[:2].argmax(-1)).__dict__ == {"accepted": 0, "next_token": 3}


def test_truncate_and_proposal() -> None:
    q = truncate_top_k(np.array([0.1, 0.4, 0.3, 0.2]), 2)
    np.testing.assert_array_equal(q.ids, [1, 2])
    np.testing.assert_allclose(q.probs, [4 / 7, 3 / 7])
    assert q.prob_of(2) == pytest.approx(3 / 7) and q.prob_of(0) == 0.0
    greedy = proposal(np.array([0.0, 3.0, 1.0]), SamplingParams(), 4)
    assert greedy.ids.tolist() == [1] and greedy.probs.tolist() == [1.0]


def test_tau_stopping() -> None:
    router = MaxProbRouter()
    sure, unsure = np.array([10.0, 0.0, 0.0]), np.array([0.1, 0.0, 0.0])
    assert keep_drafting(router, sure, 1, gamma_max=4, tau=0.8)
    assert not keep_drafting(router, unsure, 1, gamma_max=4, tau=0.8)
    assert keep_drafting(router, unsure, 1, gamma_max=4, tau=0.0)
    assert not keep_drafting(router, sure, 4, gamma_max=4, tau=0.0)


def test_sample_is_seeded() -> None:
    p = np.array([0.2, 0.0, 0.5, 0.3])
    a = [sample(p, make_rng(7)) for _ in range(3)]
    assert a == [sample(p, make_rng(7)) for _ in range(3)]
    draws = [sample(p, make_rng(s)) for s in range(2000)]
    assert 1 not in draws


def test_rejection_sampling_is_exact() -> None:
    """Two drafted positions with a proposal that misses part of the target's support: the first two emitted
    tokens follow the target exactly (chi-square over 20,000 rounds, fixed seed)."""
    v = 6
    rng = make_rng(1234)
    p = np.array([[0.3, 0.25, 0.2, 0.15, 0.1, 0.0], [0.05, 0.05, 0.4, 0.3, 0.1, 0.1], [1 / 6] * 6])
    q_full = np.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.5], [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]])
    counts = np.zeros((v, v))
    n = 20_000
    for _ in range(n):
        qs = [truncate_top_k(q_full[i], 3) for i in range(2)]  # K = 3 of 6: some target mass has q = 0
        drafts = [int(qs[0].ids[sample(qs[0].probs, rng)]), int(qs[1].ids[sample(qs[1].probs, rng)])]
        verdict = verify_sampled(drafts, qs, p, rng)
        emitted = [*drafts[: verdict.accepted], verdict.next_token]
        if len(emitted) == 1:  # rejected at the first position: draw the second token from the target directly
            emitted.append(sample(p[1], rng))
        counts[emitted[0], emitted[1]] += 1
    # The second row of p does not depend on the first token here, so the joint is an outer product.
    expected = np.outer(p[0], p[1]) * n
    keep = expected > 0
    assert counts[~keep].sum() == 0
    _, pvalue = stats.chisquare(counts[keep], expected[keep])
    assert pvalue > 1e-3, pvalue


def test_sparse_dist_repr_shows_shape() -> None:
    assert "K=2" in repr(SparseDist(ids=np.array([4, 1]), probs=np.array([0.6, 0.4])))


def test_tiny_temperatures_are_greedy_and_infinite_ones_refused() -> None:
    """Found by fuzzing: logits / 1e-40 overflows to inf and NaN probabilities; such temperatures mean greedy."""
    from tandem.config import MIN_TEMPERATURE

    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
