"""Lossless degradation: a drafter that fails mid-request costs speed, never output."""

from __future__ import annotations

import time

import grpc
import pytest
from conftest import SPECULATE_ALWAYS, TINY, make_engine
from test_services import Stack

from orchestrator.clients import ModelServiceError
from orchestrator.config import OrchestratorConfig
from orchestrator.generation import GenerateParams
from orchestrator.server import OrchestratorServiceConfig
from orchestrator.server import build_server as build_orchestrator
from primary_svc.server import PrimaryServiceConfig
from primary_svc.server import build_server as build_primary
from secondary_svc.server import SecondaryServiceConfig
from secondary_svc.server import build_server as build_secondary
from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.engine import Engine
from tandem.decoding.rounds import GenerationStats, Request, run_request
from tandem.decoding.workers import DrafterWorker, PrimaryWorker
from tandem.errors import DrafterUnavailableError
from tandemrpc.client import TandemClient

SPEC = SpecConfig(gamma_max=4, tau=0.0)


class FailingDrafter:
    """Wraps a DrafterAPI; raises DrafterUnavailableError from call number `fail_at` on (0 = at start)."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls, self.closed = inner, fail_at, 0, False

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls > self.fail_at:
            raise DrafterUnavailableError("secondary: UNAVAILABLE: connection refused")

    def start(self, *args):
        self._maybe_fail()
        return self.inner.start(*args)

    def advance(self, *args):
        self._maybe_fail()
        return self.inner.advance(*args)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def test_a_failing_drafter_costs_speed_not_output(tiny_engine: Engine) -> None:
    """The drafter fails at its first, second or fourth call: the request finishes with the primary alone and its
    greedy tokens are exactly the primary's; both sessions are released."""
    prompt = (3, 17, 9, 40)
    want = tiny_engine.generate(list(prompt), mode="primary", max_tokens=40).token_ids
    for mode in ("speed", "tandem-speed"):
        for fail_at in (0, 1, 3):
            req = Request(prompt, mode, 40, SamplingParams(), SPEC)
            limit = req.validate(TINY.vocab_size, tiny_engine.max_len)
            worker = tiny_engine.drafters[mode]
            assert worker is not None
            session = f"{mode}-{fail_at}"
            drafter = FailingDrafter(worker.open(session, req.sampling, req.spec), fail_at)
            stats = GenerationStats()
            loop = run_request(req, session, tiny_engine.primary_worker, drafter, max_tokens=limit, stats=stats)
            assert [t for chunk in loop for t in chunk] == want, (mode, fail_at)
            assert stats.drafter_failures == 1 and drafter.closed
            assert stats.rounds == fail_at  # rounds drafted before the failure; the rest were primary steps
            assert len(tiny_engine.primary_worker.pool) == 0 and len(worker.pool) == 0
    print("\nchaos: drafter failure injected at call 1, 2, 4 x (speed, tandem-speed): 6 faults, 6 outputs identical, "
          "0 leaked sessions")  # fmt: skip


def test_stopping_the_secondary_mid_request_keeps_the_output(tiny_params) -> None:
    """Through gRPC: the Secondary server stops after the first chunk; the request still yields the primary's greedy
    tokens; later requests skip the Secondary (marked down) with the same tokens; once it is back and healthy,
    requests draft again."""
    served, reference = make_engine(tiny_params, max_len=256, slots=2), make_engine(tiny_params, max_len=256)
    primary_worker = PrimaryWorker(served.primary)
    primary = build_primary(primary_worker, PrimaryServiceConfig()).start()
    drafters = {
        "tandem": DrafterWorker(served.drafters["tandem-speed"].runner),
        "vanilla": DrafterWorker(served.drafters["speed"].runner),
    }
    secondary = build_secondary(drafters, SecondaryServiceConfig()).start()
    core_cfg = OrchestratorConfig(
        payoff=SPECULATE_ALWAYS,
        primary_target=primary.address,
        secondary_target=secondary.address,
        vocab_size=TINY.vocab_size,
        max_len=256,
        default_spec=SPEC,
    )
    orch, core = build_orchestrator(OrchestratorServiceConfig(core=core_cfg), None)
    orch.start()
    client = TandemClient(orch.address, timeout_s=60)
    try:
        prompt = [8, 1, 30, 12]
        want = reference.generate(prompt, mode="primary", max_tokens=48).token_ids
        stream = client.generate(prompt, mode="tandem-speed", max_tokens=48)
        got = list(next(stream).token_ids)
        secondary.stop(0)  # the drafter dies mid-request
        chunks = list(stream)
        got += [t for c in chunks for t in c.token_ids]
        assert got == want
        for mode in ("speed", "tandem-speed"):  # new requests while the Secondary is marked down: primary alone
            chunks = list(client.generate(prompt, mode=mode, max_tokens=48))
            assert [t for c in chunks for t in c.token_ids] == want and chunks[-1].stats.rounds == 0
        assert core.metrics.drafter_fallbacks._value.get() == 1  # only the request that saw it fail
        port = int(secondary.address.rsplit(":", 1)[1])
        secondary = build_secondary(drafters, SecondaryServiceConfig(port=port)).start()  # the drafter is back
        time.sleep(2.1)  # the down mark expires; the next request health-checks it back in
        chunks = list(client.generate(prompt, mode="tandem-speed", max_tokens=48))
        assert [t for c in chunks for t in c.token_ids] == want and chunks[-1].stats.rounds > 0
        print("\nchaos: Secondary server stopped mid-request, then restarted: 4 requests, 4 outputs identical, "
              "drafting resumed after the health check")  # fmt: skip
        assert len(primary_worker.pool) == 0
    finally:
        client.close()
        for s in (orch, secondary, primary):
            s.stop(0)
        core.close()


def test_losing_the_primary_replica_re_prefills_on_another(tiny_params) -> None:
    """Two primary replicas: the one serving a request stops after its first chunk; the orchestrator re-prefills the
    prompt and the tokens so far on the other and the output is still the primary's greedy output. With no replica
    left, requests get UNAVAILABLE with a message that says so."""
    engines = [make_engine(tiny_params, max_len=256, slots=2) for _ in range(2)]
    reference = make_engine(tiny_params, max_len=256)
    workers = [PrimaryWorker(e.primary) for e in engines]
    primaries = [build_primary(w, PrimaryServiceConfig()).start() for w in workers]
    drafters = {
        "tandem": DrafterWorker(engines[0].drafters["tandem-speed"].runner),
        "vanilla": DrafterWorker(engines[0].drafters["speed"].runner),
    }
    secondary = build_secondary(drafters, SecondaryServiceConfig()).start()
    core_cfg = OrchestratorConfig(
        payoff=SPECULATE_ALWAYS,
        primary_target=",".join(p.address for p in primaries),
        secondary_target=secondary.address,
        vocab_size=TINY.vocab_size,
        max_len=256,
        default_spec=SPEC,
    )
    orch, core = build_orchestrator(OrchestratorServiceConfig(core=core_cfg), None)
    orch.start()
    client = TandemClient(orch.address, timeout_s=60)
    try:
        prompt = [5, 9, 2, 33, 7]
        want = reference.generate(prompt, mode="primary", max_tokens=48).token_ids
        stream = client.generate(prompt, mode="tandem-speed", max_tokens=48)
        got = list(next(stream).token_ids)
        serving = [len(w.pool) for w in workers].index(1)
        primaries[serving].stop(0)  # the replica holding this request's cache is lost
        got += [t for c in stream for t in c.token_ids]
        assert got == want
        assert core.metrics.primary_failovers._value.get() == 1
        assert len(workers[1 - serving].pool) == 0 and len(drafters["tandem"].pool) == 0
        primaries[1 - serving].stop(0)  # no replica left
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate(prompt, mode="primary", max_tokens=8))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no other one is left" in err.value.details()
        print("\nchaos: primary replica lost mid-request: re-prefilled on the other, output identical; "
              "both lost: UNAVAILABLE")  # fmt: skip
    finally:
        client.close()
        for s in (orch, secondary, *primaries):
            s.stop(0)
        core.close()


def test_the_clients_deadline_bounds_every_model_service_call(tiny_params) -> None:
    """The orchestrator cuts each model-service call to the client's remaining time: a request whose deadline has
    passed stops with DEADLINE_EXCEEDED before calling on, and releases its sessions."""
    stack = Stack(tiny_params)
    try:
        time.sleep(0.01)
        generation = stack.core.generate(
            GenerateParams(token_ids=(1, 2, 3), max_tokens=8, mode="tandem-speed"), time_remaining_s=1e-6
        )
        with pytest.raises(ModelServiceError) as err:
            list(generation)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        generation.close()
        assert stack.settled_sessions() == 0
        ok = stack.core.generate(GenerateParams(token_ids=(1, 2, 3), max_tokens=8), time_remaining_s=30.0)
        assert [c for c in ok][-1].finish_reason == "length"
    finally:
        stack.close()
