"""Session bookkeeping of the workers the model services serve."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import make_engine

from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.workers import DrafterWorker, PrimaryWorker
from tandem.errors import (
    ContextFullError,
    InvalidRequestError,
    PoolExhaustedError,
    SessionNotFoundError,
    SessionStateError,
)


@pytest.fixture()
def workers(tiny_params) -> tuple[PrimaryWorker, DrafterWorker]:
    engine = make_engine(tiny_params, max_len=64, slots=2)
    return PrimaryWorker(engine.primary), DrafterWorker(engine.drafters["tandem"].runner)


def test_pool_limits_and_release(workers) -> None:
    primary, _ = workers
    greedy = SamplingParams()
    primary.prefill("a", [1, 2], greedy, False)
    primary.prefill("b", [1, 2], greedy, False)
    with pytest.raises(PoolExhaustedError):
        primary.prefill("c", [1, 2], greedy, False)
    with pytest.raises(SessionStateError):
        primary.prefill("a", [1, 2], greedy, False)  # a live id cannot be reused
    assert primary.release("a") and not primary.release("a")
    primary.prefill("c", [1, 2], greedy, False)  # the freed slot serves a new session
    assert len(primary.pool) == 2


def test_idle_sessions_expire(workers) -> None:
    primary, drafter = workers
    primary.prefill("old", [1, 2], SamplingParams(), False)
    drafter.open("old", SamplingParams(), SpecConfig())
    time.sleep(0.05)
    primary.prefill("new", [1, 2], SamplingParams(), False)
    assert primary.expire_idle(0.04) == ["old"] and drafter.expire_idle(0.04) == ["old"]
    with pytest.raises(SessionNotFoundError):
        primary.verify("old", [3], [], True, False)
    primary.verify("new", [3], [], True, False)


def test_failed_prefill_leaves_no_session(workers) -> None:
    primary, _ = workers
    with pytest.raises(ContextFullError):
        primary.prefill("long", list(range(1, 40)) * 2, SamplingParams(), False)
    assert len(primary.pool) == 0


def test_drafter_rejects_out_of_order_and_bad_states(workers) -> None:
    _, drafter = workers
    drafter.open("s", SamplingParams(), SpecConfig(gamma_max=2, tau=0.0))
    with pytest.raises(SessionStateError):
        drafter.advance("s", 0, None, 1, 2)
    with pytest.raises(InvalidRequestError, match="shape"):
        drafter.start("s", [1, 2, 3], np.zeros((2, 2, 32), np.float32), 4, 2)
    with pytest.raises(InvalidRequestError, match="NaN"):
        drafter.start("s", [1, 2, 3], np.full((3, 2, 32), np.inf, np.float32), 4, 2)
    drafts = drafter.start("s", [1, 2, 3], np.zeros((3, 2, 32), np.float32), 4, 2)
    assert len(drafts.tokens) == 2
    with pytest.raises(InvalidRequestError, match="accepted"):
        drafter.advance("s", 3, np.zeros((4, 2, 32), np.float32), 1, 2)  # only 2 were drafted
