"""Warm-up: the compile plan's memory-map guard, progress, and the compiled-program counter."""

from __future__ import annotations

import itertools
import logging

import jax
import numpy as np
import pytest

from tandem.decoding import warmup
from tandem.errors import WarmupError


def _fake_maps(monkeypatch: pytest.MonkeyPatch, limit: int, per_shape: int) -> None:
    """Memory maps that start at 1,000 and grow by per_shape with each compiled shape."""
    counts = itertools.count()
    monkeypatch.setattr(warmup, "map_limit", lambda: limit)
    monkeypatch.setattr(warmup, "memory_maps", lambda: 1000 + per_shape * next(counts))


def test_a_plan_that_fits_compiles_every_shape_and_logs_progress(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_maps(monkeypatch, limit=65530, per_shape=40)
    done: list[int] = []
    with caplog.at_level(logging.INFO, logger=warmup.__name__):
        assert warmup.compile_all(list(range(50)), done.append, what="primary", smaller="--slots") == 50
    assert done == list(range(50))
    assert "primary warm-up: 50/50 shapes compiled" in caplog.text


def test_a_plan_that_would_pass_half_the_map_limit_stops_early_and_says_what_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_maps(monkeypatch, limit=65530, per_shape=500)  # 200 shapes: ~100,000 maps
    done: list[int] = []
    with pytest.raises(WarmupError) as err:
        warmup.compile_all(list(range(200)), done.append, what="secondary", smaller="--slots (16)")
    assert len(done) == 1  # stopped after the first shape's projection, long before the limit
    message = str(err.value)
    for part in ("secondary", "200 shapes", "vm.max_map_count (65,530)", "--slots (16)", "sysctl -w vm.max_map_count="):
        assert part in message, message


def test_without_a_map_limit_every_shape_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "map_limit", lambda: None)
    done: list[int] = []
    assert warmup.compile_all([1, 2, 3], done.append, what="primary", smaller="--slots") == 3
    assert done == [1, 2, 3]


def test_the_counter_counts_each_new_program_once() -> None:
    before = warmup.compiled_programs()
    f = jax.jit(lambda x: x * 3 + 1)
    f(np.ones(7, np.float32))
    f(np.ones(7, np.float32))  # the same program
    f(np.ones(9, np.float32))  # a new shape, a new program
    assert warmup.compiled_programs() - before == 2
