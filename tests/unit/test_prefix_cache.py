"""The primary's prefix cache: prompts that start like an earlier one prefill only the rest, with the same first
token, states and continuation as a cold prefill, and without touching other sessions."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, make_engine

from tandem.config import BatchingConfig, SamplingParams
from tandem.decoding.workers import PrimaryWorker

GREEDY = SamplingParams()
SYSTEM = [5, 9, 2, 33, 7, 1, 40, 12, 3, 3, 27, 8]  # a shared "system prompt"


@pytest.fixture()
def pair(tiny_params) -> tuple[PrimaryWorker, PrimaryWorker]:
    """(with a 2-row prefix cache, without one), each on its own cache of 3 slots."""
    warm = make_engine(tiny_params, max_len=128, slots=3).primary
    cold = make_engine(tiny_params, max_len=128, slots=3).primary
    return PrimaryWorker(warm, prefix_rows=2), PrimaryWorker(cold, prefix_rows=0)


def _decode(worker: PrimaryWorker, session: str, prompt: list[int], steps: int = 10) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after a prefill, and the prefill's states."""
    first = worker.prefill(session, prompt, GREEDY, True)
    tokens = [first.next_token]
    for _ in range(steps):
        tokens.append(worker.verify(session, [tokens[-1]], [], True, False).next_token)
    worker.release(session)
    assert first.hidden is not None
    return tokens, first.hidden


def test_a_shared_prefix_is_reused_and_changes_nothing(pair) -> None:
    warm, cold = pair
    assert warm.prefixes is not None and cold.prefixes is None
    prompts = [[*SYSTEM, 4, 4, 19], [*SYSTEM, 30, 2], [*SYSTEM[:5], 11], [*SYSTEM, 4, 4, 19]]
    for i, prompt in enumerate(prompts):
        got, got_states = _decode(warm, f"w{i}", prompt)
        want, want_states = _decode(cold, f"c{i}", prompt)
        assert got == want
        np.testing.assert_allclose(got_states, want_states, rtol=1e-5, atol=1e-5)
        assert got_states.shape == (len(prompt), len(warm.runner.taps), TINY.d_model)
    # The first prompt is cold; the second reuses the 12 system tokens (and takes over the first one's row), the
    # third 5 of them (and goes to the other row: it shares less than was reused), the fourth the 12 again.
    assert warm.prefixes.hits == 3
    assert warm.prefixes.reused == len(SYSTEM) + 5 + len(SYSTEM)
    _decode(warm, "again", prompts[3])
    assert warm.prefixes.reused == 2 * len(SYSTEM) + 5 + len(prompts[3]) - 1  # a repeat: all but its last token


def test_a_family_keeps_one_row_and_rows_go_least_recently_used(pair) -> None:
    warm, _ = pair
    assert warm.prefixes is not None
    other = [17, 18, 19, 20, 21, 22, 23]
    expected_hits = [0, 0, 1, 2, 2, 2, 2]
    for i, prompt in enumerate(
        [
            [*SYSTEM, 1],  # row 0
            other,  # row 1
            [*SYSTEM, 2],  # reuses row 0 and takes it over (its family's row), so `other` stays
            [*other, 5],  # reuses row 1
            [44, 45, 46],  # shares nothing: replaces the least recently used row, SYSTEM's
            [*SYSTEM, 3],  # SYSTEM is gone; replaces `other`'s row
            [*other, 6],  # gone too
        ]
    ):
        _decode(warm, f"s{i}", prompt, steps=1)
        assert warm.prefixes.hits == expected_hits[i], i


def test_reuse_does_not_disturb_running_sessions(pair) -> None:
    """A prefix copied into one slot leaves the other slots' caches alone: a session decoding across another's
    prefix hit continues exactly as it would alone."""
    warm, cold = pair
    alone, _ = _decode(cold, "alone", [*SYSTEM, 6, 6], steps=12)
    _decode(warm, "seed", [*SYSTEM, 7])  # fills a row with SYSTEM
    first = warm.prefill("x", [*SYSTEM, 6, 6], GREEDY, False)
    tokens = [first.next_token]
    for step in range(12):
        if step == 4:
            warm.prefill("y", [*SYSTEM, 8, 8, 8], GREEDY, False)  # a prefix hit into another slot, mid-decode
        tokens.append(warm.verify("x", [tokens[-1]], [], True, False).next_token)
    assert tokens == alone
    assert warm.prefixes is not None and warm.prefixes.hits == 2


def test_a_prefix_cache_needs_a_row(tiny_params) -> None:
    from tandem.model.kvcache import PrefixCache

    runner = make_engine(tiny_params, slots=1).primary
    with pytest.raises(ValueError, match="at least one row"):
        PrefixCache(runner.cache, 0, (1, TINY.d_model))


def test_reuse_stops_at_the_first_segment(pair) -> None:
    """A long shared prefix reuses the first 64 positions (the rows' size) and computes the rest."""
    warm, cold = pair
    assert warm.prefixes is not None and warm.prefixes.size == 64
    long = [(7 * i + 3) % TINY.vocab_size for i in range(70)]
    _decode(warm, "seed", long)
    prompt = [*long[:68], 1, 2, 3]
    got, got_states = _decode(warm, "w", prompt)
    want, want_states = _decode(cold, "c", prompt)
    assert got == want
    np.testing.assert_allclose(got_states, want_states, rtol=1e-5, atol=1e-5)
    assert warm.prefixes.reused == 64


def test_prefills_batched_together_reuse_alike(tiny_params) -> None:
    """Prefills that meet in one batch, some reusing a row and one filling it, give the cold prefills' tokens."""
    import threading

    batching = BatchingConfig(window_s=0.2)
    warm = PrimaryWorker(make_engine(tiny_params, max_len=128, slots=3).primary, batching, prefix_rows=2)
    cold = PrimaryWorker(make_engine(tiny_params, max_len=128, slots=3).primary, batching, prefix_rows=0)
    _decode(warm, "seed", [*SYSTEM, 9])
    prompts = {"a": [*SYSTEM, 4, 4], "b": [*SYSTEM, 30], "c": [40, 41, 42, 43]}
    firsts: dict[str, int] = {}
    barrier = threading.Barrier(len(prompts))
    batches, calls = warm.batcher.batches, warm.batcher.calls

    def prefill(session: str) -> None:
        barrier.wait()
        firsts[session] = warm.prefill(session, prompts[session], GREEDY, False).next_token

    threads = [threading.Thread(target=prefill, args=(s,)) for s in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warm.batcher.calls - calls > warm.batcher.batches - batches  # some of the prefills shared a batch
    for session, prompt in prompts.items():
        tokens = [firsts[session]]
        for _ in range(8):
            tokens.append(warm.verify(session, [tokens[-1]], [], True, False).next_token)
        assert tokens == _decode(cold, session, prompt, steps=8)[0], session
    assert warm.prefixes is not None and warm.prefixes.hits == 2
