"""Costs of single model calls, measured on this machine: the primary's verify of a block of k tokens, one drafter
step. `tandem tune` prices speculation rounds with them (`tandem.training.tuning`); `tandem bench` reports them.

Every function here times calls on a free cache row it leaves empty again, so no request may run meanwhile.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tandem.model.drafter import DrafterRunner
    from tandem.model.primary import PrimaryRunner


def _time_ms(fns: Sequence[Callable[[], object]], calls: int, warmup: int) -> list[float]:
    """Median ms per call of each function; the timed calls go round-robin, so drift hits every function alike."""
    for fn in fns:
        for _ in range(warmup):  # compiles each shape
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(ts) for ts in times]


def _context_ids(n: int, vocab_size: int) -> Any:
    return (np.arange(n, dtype=np.int32) * 7919 % max(1, vocab_size - 1) + 1)[None, :]  # [1, n] arbitrary tokens


def measure_block_cost(
    primary: PrimaryRunner, *, context: int, max_k: int = 16, calls: int = 9, warmup: int = 2, row: int = 0
) -> dict[int, float]:
    """ms per `PrimaryRunner.forward` of k = 1..max_k tokens after `context` cached tokens (median of `calls`).

    The k's take turns (one call each, `calls` times over), after `warmup` calls of each. Uses cache slot `row` (free:
    no request may run meanwhile) and leaves it empty.
    """
    return measure_block_costs([primary], context=context, max_k=max_k, calls=calls, warmup=warmup, row=row)[0]


def measure_block_costs(
    primaries: Sequence[PrimaryRunner],
    *,
    context: int,
    max_k: int = 16,
    calls: int = 9,
    warmup: int = 2,
    row: int = 0,
) -> list[dict[int, float]]:
    """`measure_block_cost` of several runners at once, every (runner, k) taking turns, so drift hits all alike."""
    ks = range(1, max_k + 1)
    fns = []
    for primary in primaries:
        primary.truncate(row, 0)
        if context:
            primary.forward(_context_ids(context, primary.cfg.vocab_size), [row])
            primary.commit(row, context)
        blocks = [np.ones((1, k), dtype=np.int32) for k in ks]
        fns += [functools.partial(primary.forward, block, [row]) for block in blocks]  # forward does not advance
    try:
        ms = _time_ms(fns, calls, warmup)
    finally:
        for primary in primaries:
            primary.truncate(row, 0)
    return [dict(zip(ks, ms[i * max_k : (i + 1) * max_k], strict=True)) for i in range(len(primaries))]


def measure_drafter_step(
    drafter: DrafterRunner, *, context: int, calls: int = 9, warmup: int = 2, row: int = 0
) -> float:
    """ms per `DrafterRunner.step` of one token after `context` cached positions (median of `calls`).

    The context is filled by the drafter's own step (a Tandem drafter normally ingests the primary's states there;
    what the positions hold does not change the cost). Uses slot `row` and leaves it empty.
    """
    one = np.ones((1, 1), dtype=np.int32)

    def step() -> None:
        drafter.step(one, [row])
        drafter.truncate(row, context)

    drafter.truncate(row, 0)
    try:
        if context:
            drafter.step(_context_ids(context, drafter.cfg.vocab_size), [row])
        return _time_ms([step], calls, warmup)[0]
    finally:
        drafter.truncate(row, 0)
