"""The orchestrator's speculation payoff (orchestrator/payoff.py): which path a lone speculative request takes, from
the rates this server measured; the path it takes never changes greedy output."""

from __future__ import annotations

import pytest
from test_services import Stack, _metric

from orchestrator.payoff import PayoffConfig, SpeculationPayoff
from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.rounds import GenerationStats

GREEDY = SamplingParams()
SPEC = SpecConfig(gamma_max=4, tau=0.0)  # the Stack's default settings


def _stats(seconds_per_token: float, tokens: int = 64, **kw) -> GenerationStats:
    return GenerationStats(output_tokens=tokens, elapsed_s=seconds_per_token * tokens, **kw)


def _plain(seconds_per_token: float, **kw) -> GenerationStats:
    """A speculative request this payoff ran primary-only."""
    return _stats(seconds_per_token, speculation_skipped=True, **kw)


SPECULATIVE, PLAIN = ("tandem-speed", True, SPEC, True), ("tandem-speed", True, SPEC, False)


def _decisions(payoff: SpeculationPayoff, n: int) -> list[bool]:
    return [payoff.speculate("tandem-speed", GREEDY, SPEC) for _ in range(n)]


def test_unmeasured_paths_are_tried_first_then_the_faster_wins_but_for_exploration() -> None:
    payoff = SpeculationPayoff(PayoffConfig(explore_every=4))
    assert _decisions(payoff, 2) == [True, True]  # no speculative rate yet
    payoff.observe("tandem-speed", GREEDY, SPEC, _stats(0.020), alone=True)
    assert _decisions(payoff, 1) == [False]  # no plain rate yet: the primary alone next
    payoff.observe("tandem-speed", GREEDY, SPEC, _plain(0.015), alone=True)
    # Decisions 4 .. 11: plain is faster; every 4th decision explores speculation.
    assert _decisions(payoff, 8) == [True, False, False, False, True, False, False, False]
    for _ in range(12):  # speculation turns faster (exponential average, weight 0.25)
        payoff.observe("tandem-speed", GREEDY, SPEC, _stats(0.010), alone=True)
    assert payoff.rate(SPECULATIVE) == pytest.approx(0.010, rel=0.05) and payoff.rate(PLAIN) == 0.015
    assert _decisions(payoff, 4) == [False, True, True, True]  # decision 12 explores the primary alone


def test_rates_are_kept_per_mode_settings_sampling_and_path() -> None:
    payoff = SpeculationPayoff()
    payoff.observe("tandem-speed", GREEDY, SPEC, _stats(0.020), alone=True)
    payoff.observe("tandem-speed", GREEDY, SPEC, _plain(0.010), alone=True)
    assert not payoff.speculate("tandem-speed", GREEDY, SPEC)
    assert payoff.speculate("speed", GREEDY, SPEC)  # the vanilla drafter's rate is not measured yet
    assert payoff.speculate("tandem-speed", GREEDY, SpecConfig(gamma_max=2))  # nor γ = 2's
    unseeded = SamplingParams(temperature=0.8)
    assert payoff.speculate("tandem-speed", unseeded, SPEC)  # nor sampled requests'
    payoff.observe("tandem-speed", unseeded, SPEC, _stats(0.020), alone=True)
    assert not payoff.speculate("tandem-speed", unseeded, SPEC)  # their primary-only rate is not measured yet
    payoff.observe("tandem-speed", unseeded, SPEC, _plain(0.030), alone=True)
    assert payoff.speculate("tandem-speed", unseeded, SPEC)  # sampled, speculation is the faster
    # Primary-mode requests (another population of prompts) and standalone Tandem are not counted at all.
    payoff.observe("primary", GREEDY, SPEC, _stats(1e-6), alone=True)
    payoff.observe("tandem", GREEDY, SPEC, _stats(1e-6), alone=True)
    assert payoff.rate(PLAIN) == 0.010 and payoff.rate(("tandem", True, SPEC, True)) is None


def test_seeded_sampled_requests_and_a_disabled_payoff_always_speculate() -> None:
    payoff = SpeculationPayoff()
    seeded = SamplingParams(temperature=0.8, seed=7)
    payoff.observe("tandem-speed", seeded, SPEC, _stats(0.050), alone=True)
    payoff.observe("tandem-speed", seeded, SPEC, _plain(0.010), alone=True)
    assert all(payoff.speculate("tandem-speed", seeded, SPEC) for _ in range(20))
    off = SpeculationPayoff(PayoffConfig(enabled=False))
    off.observe("tandem-speed", GREEDY, SPEC, _stats(0.050), alone=True)
    off.observe("tandem-speed", GREEDY, SPEC, _plain(0.010), alone=True)
    assert all(off.speculate("tandem-speed", GREEDY, SPEC) for _ in range(20))


@pytest.mark.parametrize(
    ("stats", "alone"),
    [
        (_stats(0.01), False),  # another session shared the replica: not the load-1 rate
        (_stats(0.01, tokens=4), True),  # too short: the prefill dominates
        (_stats(0.01, primary_failovers=1), True),
        (_stats(0.01, drafter_failures=1), True),
        (_stats(0.01, load_shed=True), True),  # speculative first, primary-only after
        (_plain(0.01), False),
        (_plain(0.01, primary_failovers=1), True),
    ],
    ids=["loaded", "short", "failover", "drafter-failure", "shed", "loaded-plain", "failover-plain"],
)
def test_requests_that_did_not_run_one_path_cleanly_are_not_measured(stats: GenerationStats, alone: bool) -> None:
    payoff = SpeculationPayoff()
    payoff.observe("tandem-speed", GREEDY, SPEC, stats, alone=alone)
    assert payoff.rate(SPECULATIVE) is None and payoff.rate(PLAIN) is None


def test_config_is_checked() -> None:
    for bad in (dict(explore_every=1), dict(weight=0.0), dict(min_tokens=0)):
        with pytest.raises(ValueError):
            PayoffConfig(**bad)  # type: ignore[arg-type]


def _generate(stack: Stack, prompt: list[int], mode: str = "tandem-speed") -> tuple[list[int], object]:
    chunks = list(stack.client.generate(prompt, mode=mode, max_tokens=16))
    return [t for c in chunks for t in c.token_ids], chunks[-1].stats


def test_through_grpc_a_lone_request_takes_the_faster_path_and_emits_the_primarys_tokens(tiny_params) -> None:
    """With the primary alone measured faster, a tandem-speed request opens no drafter and asks its prefill for no
    states, and the next ones do again once speculation measures faster; each request's own rate then joins the
    averages; the output is the primary's either way."""
    stack = Stack(tiny_params, payoff=PayoffConfig(explore_every=100))
    asked_states: list[bool] = []
    real_prefill = stack.primary_worker.prefill
    stack.primary_worker.prefill = lambda *a: asked_states.append(a[-1]) or real_prefill(*a)  # type: ignore[method-assign]
    payoff = stack.core.payoff
    try:
        prompt = [3, 17, 9, 4]
        want = stack.reference.generate(tuple(prompt), mode="primary", max_tokens=16).token_ids
        payoff.observe("tandem-speed", GREEDY, SPEC, _stats(1.0), alone=True)
        payoff.observe("tandem-speed", GREEDY, SPEC, _plain(1e-6), alone=True)
        got, stats = _generate(stack, prompt)
        assert got == want and stats.rounds == 0 and asked_states == [False]
        assert stack.core.metrics.speculation_skipped._value.get() == 1 and stack.core.metrics.drafts._value.get() == 0
        assert payoff.rate(PLAIN) > 1e-6  # this request's own rate, measured alone
        port = stack.orchestrator.metrics_port
        gauge = 'tandem_payoff_seconds_per_token{mode="tandem-speed",path="primary-only"}'
        assert _metric(port, gauge) == pytest.approx(payoff.rate(PLAIN))
        assert stack.settled_sessions() == 0

        for _ in range(8):  # speculation measured far faster now
            payoff.observe("tandem-speed", GREEDY, SPEC, _stats(1e-9), alone=True)
        payoff.observe("tandem-speed", GREEDY, SPEC, _plain(1.0), alone=True)
        before = payoff.rate(SPECULATIVE)
        got, stats = _generate(stack, prompt)
        assert got == want and stats.rounds > 0 and asked_states[-1] is True
        assert stack.core.metrics.speculation_skipped._value.get() == 1
        assert payoff.rate(SPECULATIVE) != before  # its own rate joined the average
        assert stack.settled_sessions() == 0
    finally:
        stack.close()


def test_a_request_sharing_its_replica_is_not_measured(tiny_params) -> None:
    """Its orchestrator runs nothing else, so the payoff decides (primary-only), but the replica reports another
    orchestrator's session: the request's rate is not the load-1 rate. Alone, the same request is measured."""
    stack = Stack(tiny_params, payoff=PayoffConfig(explore_every=100))
    payoff = stack.core.payoff
    try:
        payoff.observe("tandem-speed", GREEDY, SPEC, _stats(1.0), alone=True)
        payoff.observe("tandem-speed", GREEDY, SPEC, _plain(1e-3), alone=True)
        before = payoff.rate(PLAIN)
        other = stack.primary_worker.prefill("another-orchestrators-request", [7, 7, 1], GREEDY, False)
        assert other.sessions == 1
        assert _generate(stack, [3, 17, 9, 4])[1].rounds == 0  # run primary-only by the payoff
        assert payoff.rate(PLAIN) == before
        stack.primary_worker.release("another-orchestrators-request")
        assert _generate(stack, [3, 17, 9, 4])[1].rounds == 0
        assert payoff.rate(PLAIN) != before
        assert stack.core.metrics.speculation_skipped._value.get() == 2
    finally:
        stack.close()
