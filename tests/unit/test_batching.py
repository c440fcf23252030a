"""Continuous batching: rows of different sessions in one call compute what each session computes alone, and
concurrent requests produce the tokens they produce one at a time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from conftest import TINY, drafter_config, make_engine

from tandem.config import BatchingConfig, SamplingParams, SpecConfig
from tandem.decoding.warmup import compiled_programs
from tandem.decoding.workers import PrimaryWorker, _Batcher, _Call
from tandem.errors import SessionNotFoundError
from tandem.model import drafter as drafter_model
from tandem.model.primary import PrimaryRunner

PROMPTS = [np.random.default_rng(i).integers(0, TINY.vocab_size, size=3 + 2 * i).tolist() for i in range(8)]


@pytest.mark.parametrize("slots", [4, 6])
def test_ragged_rows_in_one_call_equal_each_row_alone(tiny_params, slots: int) -> None:
    """Three sessions at different lengths, with blocks of 3, 1 and 5 tokens, in one padded call (batch bucket 4):
    over the whole pool of 4 slots laid out by slot, or gathered out of 6."""
    taps = drafter_config(True).tapped_layers
    batched = PrimaryRunner(TINY, tiny_params, taps=taps, batch=slots, max_len=64)
    alone = PrimaryRunner(TINY, tiny_params, taps=taps, batch=slots, max_len=64)
    rows, blocks = [2, 0, 3], [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    for row, prompt in zip(rows, PROMPTS, strict=False):
        for runner in (batched, alone):
            runner.forward(np.asarray([prompt]), rows=[row])
            runner.commit(row, len(prompt))
    tokens = np.zeros((3, 5), np.int32)
    for b, block in enumerate(blocks):
        tokens[b, : len(block)] = block
    assert batched.cache.pool_call(len(rows)) == (slots == 4)
    out = batched.forward(tokens, rows=rows, sizes=[len(b) for b in blocks])
    assert out.top.shape == (3, 5) and out.logits.shape[:2] == (3, 5)
    for b, (row, block) in enumerate(zip(rows, blocks, strict=True)):
        want = alone.forward(np.asarray([block]), rows=[row])
        n = len(block)
        np.testing.assert_array_equal(out.top[b, :n], want.top[0])
        np.testing.assert_allclose(out.logits[b, :n], want.logits[0], atol=1e-4)
        np.testing.assert_allclose(out.hidden[b, :n], want.hidden[0], atol=1e-4)
    assert batched.lengths[1] == 0  # the empty slot (and the padding row) wrote nothing it keeps
    for row, block in zip(rows, blocks, strict=True):  # the batched call wrote each row's keys/values where it should
        batched.commit(row, len(block))
        alone.commit(row, len(block))
    for row in rows:
        np.testing.assert_array_equal(
            batched.forward(np.asarray([[1]]), rows=[row]).top, alone.forward(np.asarray([[1]]), rows=[row]).top
        )


def test_ragged_ingest_equals_each_row_alone() -> None:
    cfg = drafter_config(True)
    params = drafter_model.materialize(drafter_model.init_params(cfg, seed=2), cfg)
    batched = drafter_model.DrafterRunner(cfg, params, batch=3, max_len=32)
    alone = drafter_model.DrafterRunner(cfg, params, batch=3, max_len=32)
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(n, len(cfg.tapped_layers), cfg.primary_d_model)).astype(np.float32) for n in (4, 2)]
    padded = np.zeros((2, 4, *states[0].shape[1:]), np.float32)
    for b, h in enumerate(states):
        padded[b, : h.shape[0]] = h
    batched.ingest(padded, rows=[1, 2], sizes=[4, 2])
    for row, h in zip([1, 2], states, strict=True):
        alone.ingest(h[None], rows=[row])
    np.testing.assert_array_equal(batched.lengths, alone.lengths)
    np.testing.assert_allclose(
        batched.step(np.asarray([[3], [4]]), rows=[1, 2]), alone.step(np.asarray([[3], [4]]), rows=[1, 2]), atol=1e-4
    )


def _requests() -> list[dict]:
    modes = ("speed", "tandem-speed", "speed", "tandem", "primary")
    specs = (SpecConfig(gamma_max=4, tau=0.0), SpecConfig(gamma_max=7, tau=0.8))
    reqs = [dict(prompt=p, mode=modes[i], spec=specs[i % 2], max_tokens=12 + 2 * i) for i, p in enumerate(PROMPTS[:5])]
    reqs.append(
        dict(prompt=PROMPTS[0], mode="tandem-speed", spec=specs[0], max_tokens=12, sampling=SamplingParams(0.8, seed=5))
    )
    return reqs


@pytest.mark.slow
def test_concurrent_requests_equal_one_at_a_time(tiny_params) -> None:
    """Six requests of every mode (one sampled with a seed) run at once on six slots; each gets exactly the tokens
    it gets alone, and the workers did batch them."""
    reqs = _requests()
    serial = make_engine(tiny_params, max_len=64, slots=1)
    want = [serial.generate(r.pop("prompt"), **r).token_ids for r in [dict(r) for r in reqs]]
    engine = make_engine(tiny_params, max_len=64, slots=len(reqs), batching=BatchingConfig(max_batch=8, window_s=0.02))
    barrier = threading.Barrier(len(reqs))

    def run(r: dict) -> list[int]:
        r = dict(r)
        barrier.wait()
        return engine.generate(r.pop("prompt"), **r).token_ids

    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(run, reqs))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, (i, reqs[i]["mode"])
    workers = (engine.primary_worker, engine.drafters["tandem"], engine.drafters["speed"])
    for worker in workers:
        assert worker is not None and len(worker.pool) == 0 and worker.waiting == 0
    primary = engine.primary_worker.batcher
    assert primary.calls > primary.batches  # the six prefills alone cannot all have run one by one


def test_a_failing_call_does_not_spoil_its_batch(tiny_params) -> None:
    engine = make_engine(tiny_params, max_len=64, slots=3, batching=BatchingConfig(window_s=0.5))
    worker: PrimaryWorker = engine.primary_worker
    greedy = SamplingParams()
    for s in ("a", "b"):
        worker.prefill(s, [1, 2, 3], greedy, False)
    barrier = threading.Barrier(3)

    def call(session: str) -> object:
        barrier.wait()
        try:
            return worker.verify(session, [4, 5], [], True, False)
        except SessionNotFoundError as e:
            return e

    with ThreadPoolExecutor(3) as pool:
        a, b, ghost = pool.map(call, ["a", "b", "ghost"])
    assert isinstance(ghost, SessionNotFoundError)
    assert a.next_token == b.next_token and a.accepted == b.accepted  # same history, same verdict
    assert worker.runner.lengths[worker.pool.get("a").slot] == 3 + 1 + a.accepted


def test_batcher_takes_one_call_per_session_and_caps_the_batch() -> None:
    seen: list[list[str]] = []
    gate = threading.Event()

    def run(batch: list[_Call]) -> None:
        gate.wait()
        seen.append([c.session for c in batch])
        for c in batch:
            c.result = c.session

    batcher = _Batcher(run, BatchingConfig(max_batch=2, window_s=0.0), live=lambda: ())
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, _Call("x"))
        while not batcher._busy:  # the first call runs alone; the next three queue behind it
            pass
        rest = [pool.submit(batcher.submit, _Call(s)) for s in ("x", "y", "z")]
        while batcher.waiting < 3:
            pass
        gate.set()
        assert [f.result() for f in (first, *rest)] == ["x", "x", "y", "z"]
    assert seen[0] == ["x"] and all(len(b) <= 2 for b in seen) and len(seen) == 3
    assert all(len(set(b)) == len(b) for b in seen)  # never two calls of one session in one batch


def test_the_window_waits_for_due_sessions_only() -> None:
    """A session whose calls come back quickly holds the next batch for its call (a batch stays whole); one that is
    busy elsewhere for longer than the window does not hold it."""
    seen: list[list[str]] = []

    def run(batch: list[_Call]) -> None:
        seen.append(sorted(c.session for c in batch))
        for c in batch:
            c.result = c.session

    batcher = _Batcher(run, BatchingConfig(window_s=0.5), live=lambda: ("fast", "slow"))
    for session, pause in (("slow", 1.0), ("fast", 0.2)):  # turnarounds: 1 s (past the window), then 0.2 s
        batcher.submit(_Call(session))
        time.sleep(pause)
        batcher.submit(_Call(session))
    start = time.monotonic()
    batcher.submit(_Call("fast"))  # "slow" is due in ~0.8 s: past the window, so no wait
    assert time.monotonic() - start < 0.15 and seen[-1] == ["fast"]
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(lambda: (time.sleep(0.05), batcher.submit(_Call("fast")))[1])
        assert batcher.submit(_Call("slow")) == "slow"  # "fast" (turnaround now ~0.1 s) is due: the batch waits
        assert later.result() == "fast"
    assert seen[-1] == ["fast", "slow"]


def test_busy_time_counts_batches_run_not_idle_time() -> None:
    """busy_s (the services' busy-seconds gauges) sums the time batches ran, not the time between calls."""

    def run(batch: list[_Call]) -> None:
        time.sleep(0.05)
        for c in batch:
            c.result = c.session

    batcher = _Batcher(run, BatchingConfig(window_s=0.0), live=lambda: ("a",))
    start = time.monotonic()
    for _ in range(3):
        batcher.submit(_Call("a"))
        time.sleep(0.1)
    assert 0.15 <= batcher.busy_s < 0.25 and time.monotonic() - start >= 0.45


def test_batching_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        _Batcher(lambda b: None, BatchingConfig(max_batch=0), live=lambda: ())


@pytest.mark.slow
def test_compiling_buckets_at_start_covers_serving_shapes_and_changes_no_cache(tiny_params) -> None:
    runner = PrimaryRunner(TINY, tiny_params, taps=drafter_config(True).tapped_layers, batch=4, max_len=256)
    runner.forward(np.asarray([[1, 2, 3]]), rows=[1])
    runner.commit(1, 3)

    def cache() -> list[np.ndarray]:
        return [np.asarray(b).copy() for b in jax.tree.leaves((runner.cache.k, runner.cache.v))]

    before = (cache(), runner.lengths.copy())
    # buckets: batch 1, 4; block 1, 4; context 64, 128 on XLA, the whole cache on the kernels (one program serves all)
    assert runner.compile(runner.shapes([1, 3], [1, 3], [16, 100])) == (4 if runner.fixed_order else 8)
    for got, want in zip(cache(), before[0], strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(runner.lengths, before[1])
    compiled = compiled_programs()
    # batch 4 (the whole pool, laid out by slot), block 4, context 64
    runner.forward(np.asarray([[4, 5, 6], [7, 8, 9], [1, 1, 1]]), rows=[1, 0, 2])
    runner.forward(np.asarray([[4]]), rows=[1])
    assert compiled_programs() == compiled


@pytest.mark.slow
def test_start_up_compile_covers_batched_prefills_ingests_and_drafting(tiny_params) -> None:
    """After the primary's and the Tandem drafter's start-up compile, a serving round of two sessions at once (a
    ragged prefill of 9 and 11 tokens, their ingest, drafting on device, a ragged verify) compiles nothing."""
    from primary_svc.server import serving_shapes

    cfg = drafter_config(True)
    primary = PrimaryRunner(TINY, tiny_params, taps=cfg.tapped_layers, batch=2, max_len=16)
    drafter = drafter_model.DrafterRunner(
        cfg, drafter_model.materialize(drafter_model.init_params(cfg), cfg), batch=2, max_len=16
    )
    primary.compile(serving_shapes(primary, max_batch=2))
    assert drafter.compile([1, 2], None, 0) == 2 * (1 + 5)  # batch 1, 2 x (drafting at 16; ingest 1..16)
    vanilla = drafter_config(False)
    with pytest.raises(ValueError, match="Tandem"):
        drafter_model.DrafterRunner(
            vanilla, drafter_model.materialize(drafter_model.init_params(vanilla), vanilla)
        ).compile([1], None, 0)
    compiled = compiled_programs()

    sizes = [9, 11]
    block = np.zeros((2, 11), np.int32)
    block[0, :9], block[1] = PROMPTS[3], PROMPTS[4]
    out = primary.forward(block, rows=[0, 1], sizes=sizes)
    for row, n in enumerate(sizes):
        primary.commit(row, n)
    drafter.ingest(out.hidden, rows=[0, 1], sizes=sizes)
    first = [int(out.top[b, n - 1]) for b, n in enumerate(sizes)]
    drafts = drafter.draft_greedy([[t] for t in first], [0, 1], [3, 3], [0.0, 0.0], None, 0)
    verify = np.zeros((2, 1 + max(map(len, drafts))), np.int32)
    for b, (t, d) in enumerate(zip(first, drafts, strict=True)):
        verify[b, : 1 + len(d)] = [t, *d]
    primary.forward(verify, rows=[0, 1], sizes=[1 + len(d) for d in drafts])
    assert compiled_programs() == compiled
