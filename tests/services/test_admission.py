"""Admission control and load-aware speculation: bounded running places and queue, RESOURCE_EXHAUSTED with a retry
hint beyond them, and γ that shrinks (down to primary-only rounds, losslessly) as the primary's batch fills."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import pytest
from conftest import make_engine
from test_services import Stack

from orchestrator.admission import Admission
from orchestrator.load import LoadPolicy
from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.rounds import GenerationStats, Request, run_request
from tandem.errors import OverloadedError


def test_gamma_shrinks_with_load_down_to_primary_only() -> None:
    policy = LoadPolicy(full_until=2, primary_only_from=8)
    assert [policy.gamma_cap(n, 6) for n in range(10)] == [6, 6, 6, 5, 4, 3, 2, 1, 0, 0]
    assert policy.gamma_cap(7.9, 6) == 1  # never 0 before primary_only_from
    with pytest.raises(ValueError):
        LoadPolicy(full_until=4, primary_only_from=4)


def test_admission_queues_then_rejects_with_a_hint() -> None:
    gate = Admission(max_running=1, max_queued=1, timeout_s=5.0)
    gate.enter()
    admitted = threading.Event()

    def queued() -> None:
        gate.enter()
        admitted.set()

    waiter = threading.Thread(target=queued)
    waiter.start()
    while gate.queued == 0:
        time.sleep(0.001)
    with pytest.raises(OverloadedError, match="retry in about") as e:
        gate.enter()  # one running, one queued: the limits
    assert e.value.retry_after_s > 0 and gate.running == 1 and gate.queued == 1  # the rejected one left no trace
    assert not admitted.wait(0.05)
    gate.leave()  # the queued request takes the freed place
    assert admitted.wait(5.0)
    waiter.join()
    assert gate.running == 1 and gate.queued == 0
    short = Admission(max_running=1, max_queued=4, timeout_s=0.05)
    short.enter()
    with pytest.raises(OverloadedError, match=r"within 0\.1 s"):
        short.enter()  # waited its timeout in the queue
    assert short.queued == 0 and short.running == 1


def test_load_shedding_ends_speculation_losslessly(tiny_params) -> None:
    """The cap drops to 0 after two rounds: the drafter is let go and the primary finishes the request alone."""
    engine = make_engine(tiny_params, max_len=128)
    prompt = (5, 9, 2, 30)
    want = engine.generate(prompt, mode="primary", max_tokens=30).token_ids
    caps = iter([4, 3])
    spec = SpecConfig(gamma_max=4, tau=0.0)
    worker = engine.drafters["tandem-speed"]
    assert worker is not None
    stats = GenerationStats()
    rounds = run_request(
        Request(prompt, "tandem-speed", 30, spec=spec),
        "s",
        engine.primary_worker,
        worker.open("s", SamplingParams(), spec),
        max_tokens=30,
        stats=stats,
        gamma_cap=lambda _sessions: next(caps, 0),
    )
    got = [t for chunk in rounds for t in chunk]
    assert got == want
    assert stats.load_shed and stats.rounds == 2 and stats.drafted_tokens <= 4 + 3
    assert len(worker.pool) == 0 and len(engine.primary_worker.pool) == 0


def test_overload_is_resource_exhausted_with_retry_pushback(tiny_params) -> None:
    stack = Stack(tiny_params, max_running=1, max_queued=0)
    try:
        first = stack.client.generate([3, 17, 9], mode="primary", max_tokens=100)
        next(iter(first))  # running: holds the only place
        with pytest.raises(grpc.RpcError) as e:
            list(stack.client.generate([3, 17, 9], mode="primary", max_tokens=4))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in e.value.details() and "retry in about" in e.value.details()
        pushback = dict(e.value.trailing_metadata() or ())
        assert int(pushback["grpc-retry-pushback-ms"]) >= 1000
        list(first)  # the first request finishes...
        assert stack.core.admission.running == 0
        assert len(list(stack.client.generate([3, 17, 9], mode="primary", max_tokens=4))) > 0  # ...and frees its place
        assert stack.core.metrics.rejected._value.get() == 1
    finally:
        stack.close()


def test_running_limit_follows_a_tpot_target() -> None:
    """With a target the limit starts at 1, grows one step while it binds and TPOT is well under the target, and
    drops in proportion to an overshoot once the running requests are within it."""
    gate = Admission(max_running=8, max_queued=8, timeout_s=5.0, tpot_target_s=0.1, adjust_every_s=0.0)
    assert gate.limit == 1  # slow start: nothing measured yet
    gate.observe(0.02, 1)
    assert gate.limit == 1  # fast, but nothing runs: an untested limit is not raised
    entered: list[threading.Thread] = []

    def enter_in_background() -> threading.Thread:
        t = threading.Thread(target=gate.enter)
        t.start()
        entered.append(t)
        return t

    gate.enter()
    for _ in range(5):
        enter_in_background()
    for want in range(2, 7):
        gate.observe(0.02, 1)  # fast, and the limit binds: one more place, taken by a waiter at once
        assert gate.limit == want
        _wait_for(lambda w=want: gate.running == w)
    gate.observe(0.02, 1)
    assert gate.limit == 7  # six running under six: it binds, so it grows (nobody takes the place)
    gate.observe(0.02, 1)
    assert gate.limit == 7  # six running do not bind a limit of 7: it stays
    for t in entered:
        t.join()
    gate.tpot_s = 0.0  # forget the fast tokens
    gate.observe(0.3, 1)  # 3x the target with 6 running: the limit drops to 6 * 0.1 / 0.3 = 2 at once
    assert gate.limit == 2
    gate.observe(0.3, 1)
    assert gate.limit == 2  # six still run under a limit of 2: no second cut before they drain
    for _ in range(4):
        gate.leave()
    gate.observe(0.3, 1)
    assert gate.limit == 1 and gate.running == 2
    untargeted = Admission(max_running=2, max_queued=0, timeout_s=1.0)
    untargeted.observe(10.0, 1)
    assert untargeted.limit == 2
    with pytest.raises(ValueError, match="headroom"):
        Admission(max_running=2, max_queued=0, timeout_s=1.0, tpot_target_s=0.1, headroom=1.0)


def _wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_request_the_load_would_shed_at_once_never_opens_a_drafter(tiny_params) -> None:
    """At a load where γ's cap is already 0, a speculative request runs primary-only from its prefill on: no drafter
    stream is opened and its prefill asks for no primary states; the output is the primary's."""
    stack = Stack(tiny_params, load=LoadPolicy(full_until=0, primary_only_from=1))
    asked_states = []
    primary = stack.primary_worker
    real_prefill = primary.prefill
    primary.prefill = lambda *a: asked_states.append(a[-1]) or real_prefill(*a)  # type: ignore[method-assign]
    try:
        prompt = [3, 17, 9, 4]
        want = stack.reference.generate(tuple(prompt), mode="primary", max_tokens=12).token_ids
        got = [t for r in stack.client.generate(prompt, mode="tandem-speed", max_tokens=12) for t in r.token_ids]
        assert got == want
        assert asked_states == [False]
        assert stack.core.metrics.load_shed._value.get() == 1 and stack.core.metrics.drafts._value.get() == 0
        assert stack.settled_sessions() == 0
    finally:
        stack.close()


def test_steps_report_the_replicas_open_sessions(tiny_params) -> None:
    """Every primary step carries the sessions open on its replica, whoever opened them (the load it is under)."""
    worker = make_engine(tiny_params, max_len=128, slots=4).primary_worker
    greedy = SamplingParams()
    assert worker.prefill("a", [3, 17, 9], greedy, False).sessions == 1
    step = worker.prefill("b", [5, 2], greedy, False)
    assert step.sessions == 2
    assert worker.verify("a", [step.next_token], [], True, False).sessions == 2
    worker.release("b")
    assert worker.verify("a", [step.next_token], [], True, False).sessions == 1
    worker.release("a")


def test_the_replicas_sessions_count_requests_from_other_orchestrators(tiny_params) -> None:
    """An orchestrator running one request would speculate (the default policy: full γ alone, primary-only from 2),
    but its primary also holds another orchestrator's session: the request lets its drafter go before drafting and
    its output is still the primary's, through gRPC."""
    stack = Stack(tiny_params)
    try:
        other = stack.primary_worker.prefill("another-orchestrators-request", [7, 7, 1], SamplingParams(), False)
        assert other.sessions == 1
        prompt = [3, 17, 9, 4]
        want = stack.reference.generate(tuple(prompt), mode="primary", max_tokens=12).token_ids
        got = [t for r in stack.client.generate(prompt, mode="tandem-speed", max_tokens=12) for t in r.token_ids]
        assert got == want
        assert stack.core.metrics.load_shed._value.get() == 1 and stack.core.metrics.drafts._value.get() == 0
        stack.primary_worker.release("another-orchestrators-request")
        got = [t for r in stack.client.generate(prompt, mode="tandem-speed", max_tokens=12) for t in r.token_ids]
        assert got == want
        assert stack.core.metrics.load_shed._value.get() == 1 and stack.core.metrics.drafts._value.get() > 0  # alone
        assert stack.settled_sessions() == 0
    finally:
        stack.close()
