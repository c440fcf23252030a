"""Session-affine routing: requests stay on their pods, load spreads, endpoints come and go (fake DNS and channels),
and a real orchestrator over two primary servers keeps each request's rounds on one of them."""

from __future__ import annotations

import grpc
import pytest
from conftest import SPECULATE_ALWAYS, TINY, make_engine

from orchestrator.config import OrchestratorConfig
from orchestrator.routing import EndpointPool, NoEndpointError, Targets
from orchestrator.server import OrchestratorServiceConfig
from orchestrator.server import build_server as build_orchestrator
from primary_svc.server import PrimaryServiceConfig
from primary_svc.server import build_server as build_primary
from secondary_svc.server import SecondaryServiceConfig
from secondary_svc.server import build_server as build_secondary
from tandem.config import SpecConfig
from tandem.decoding.workers import DrafterWorker, PrimaryWorker
from tandemrpc.client import TandemClient


class FakeChannel:
    def __init__(self, address: str) -> None:
        self.address, self.closed = address, False

    def close(self) -> None:
        self.closed = True


class FakeDns:
    def __init__(self, *addresses: str) -> None:
        self.addresses, self.fail = list(addresses), False

    def __call__(self, host: str, port: int) -> list[str]:
        if self.fail:
            raise OSError("temporary failure in name resolution")
        return [f"{a}:{port}" for a in self.addresses]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pool(spec: str, dns: FakeDns | None = None, clock: Clock | None = None) -> EndpointPool:
    return EndpointPool(
        "primary", Targets.parse(spec), FakeChannel, resolver=dns or FakeDns(), refresh_s=5.0, clock=clock or Clock()
    )  # type: ignore[arg-type]


def test_target_forms() -> None:
    assert Targets.parse("10.0.0.1:50051").static == ("10.0.0.1:50051",)
    assert Targets.parse("a:1, b:2").static == ("a:1", "b:2")
    t = Targets.parse("dns:///tandem-primary-headless:50051")
    assert (t.dns_host, t.dns_port, t.static) == ("tandem-primary-headless", 50051, ())
    for bad in ("", "nohost", "a:b", "dns:///nohostport", "dns:///:80", "a:1,:2"):
        with pytest.raises(ValueError, match="expected"):
            Targets.parse(bad)


def test_requests_spread_over_the_least_loaded_endpoints() -> None:
    pool = _pool("a:1,b:1,c:1")
    leases = [pool.acquire() for _ in range(6)]
    assert sorted(pool.in_flight().values()) == [2, 2, 2]
    leases[0].release()
    leases[0].release()  # idempotent
    freed = leases[0].address
    assert pool.in_flight()[freed] == 1
    assert pool.acquire().address == freed  # the least loaded endpoint gets the next request
    for lease in leases[1:]:
        lease.release()


def test_dns_endpoints_join_and_leave_without_moving_pinned_requests() -> None:
    dns, clock = FakeDns("10.0.0.1", "10.0.0.2"), Clock()
    pool = _pool("dns:///svc:50051", dns, clock)
    assert pool.addresses == ["10.0.0.1:50051", "10.0.0.2:50051"]
    pinned = pool.acquire()
    gone_channel = pinned.channel
    # 10.0.0.x where the request is pinned disappears, a new pod appears; nothing changes before the refresh interval
    dns.addresses = ["10.0.0.9"] + [a for a in ("10.0.0.1", "10.0.0.2") if f"{a}:50051" != pinned.address]
    clock.now = 4.0
    pool.acquire().release()
    assert pinned.address in pool.addresses
    clock.now = 6.0
    other = pool.acquire()
    assert pinned.address not in pool.addresses and "10.0.0.9:50051" in pool.addresses
    assert other.address != pinned.address  # no new request goes to a pod that left
    assert pinned.channel is gone_channel and not gone_channel.closed  # the pinned request keeps its pod...
    assert pool.in_flight()[pinned.address] == 1
    pinned.release()
    assert gone_channel.closed and pinned.address not in pool.in_flight()  # ...until it ends
    other.release()


def test_dns_failure_keeps_the_known_endpoints_and_no_endpoint_is_an_error() -> None:
    dns, clock = FakeDns("10.0.0.1"), Clock()
    pool = _pool("dns:///svc:1", dns, clock)
    dns.fail, clock.now = True, 10.0
    pool.acquire().release()
    assert pool.addresses == ["10.0.0.1:1"]
    dns.fail, dns.addresses, clock.now = False, [], 20.0
    with pytest.raises(NoEndpointError, match="no endpoints"):
        pool.acquire()
    dns.addresses, clock.now = ["10.0.0.3"], 30.0  # scaled back up
    assert pool.acquire().address == "10.0.0.3:1"


def test_marked_down_endpoints_are_skipped_then_health_checked_back() -> None:
    clock, healthy = Clock(), {"a:1": False}
    pool = EndpointPool(
        "secondary", Targets.parse("a:1,b:1"), FakeChannel, clock=clock, down_s=2.0,  # type: ignore[arg-type]
        health_check=lambda ch: healthy.get(ch.address, True),
    )  # fmt: skip
    pool.mark_down("a:1")
    assert {pool.acquire().address for _ in range(3)} == {"b:1"}
    clock.now = 2.5  # due: probed, still unhealthy -> down another 2 s
    assert pool.acquire().address == "b:1" and pool.down_state()["a:1"] == 4.5
    healthy["a:1"], clock.now = True, 5.0
    assert "a:1" in {pool.acquire().address for _ in range(4)}
    pool.mark_down("a:1")
    pool.mark_down("b:1")
    with pytest.raises(NoEndpointError):
        pool.acquire()


MAX_LEN = 256


def test_orchestrator_keeps_each_request_on_one_primary(tiny_params) -> None:
    """Two primary servers behind one --primary list: every request's rounds reach the pod that prefilled it, the
    output equals the in-process engine's, and requests alternate between the pods."""
    engines = [make_engine(tiny_params, max_len=MAX_LEN, slots=2) for _ in range(2)]
    reference = make_engine(tiny_params, max_len=MAX_LEN)
    workers = [PrimaryWorker(e.primary) for e in engines]
    primaries = [build_primary(w, PrimaryServiceConfig()).start() for w in workers]
    drafters = {
        "tandem": DrafterWorker(engines[0].drafters["tandem"].runner),
        "vanilla": DrafterWorker(engines[0].drafters["speed"].runner),
    }
    secondary = build_secondary(drafters, SecondaryServiceConfig()).start()
    core_cfg = OrchestratorConfig(
        payoff=SPECULATE_ALWAYS,
        primary_target=",".join(p.address for p in primaries),
        secondary_target=secondary.address,
        vocab_size=TINY.vocab_size,
        max_len=MAX_LEN,
        default_spec=SpecConfig(gamma_max=4, tau=0.0),
    )
    orch, core = build_orchestrator(OrchestratorServiceConfig(core=core_cfg), None)
    orch.start()
    client = TandemClient(orch.address, timeout_s=60)
    try:
        used = []
        for prompt in ([3, 17, 9], [40, 2, 11, 5], [8, 1, 30]):
            want = reference.generate(prompt, mode="primary", max_tokens=24).token_ids
            stream = client.generate(prompt, mode="tandem-speed", max_tokens=24)
            got = list(next(stream).token_ids)
            sessions = [len(w.pool) for w in workers]
            assert sorted(sessions) == [0, 1]  # one pod holds this request; the other never saw it
            used.append(sessions.index(1))
            got += [t for c in stream for t in c.token_ids]
            assert got == want
        assert used[0] != used[1]  # the next request went to the idle pod
        assert all(n == 0 for n in core.pools["primary"].in_flight().values())
    finally:
        client.close()
        for s in (orch, secondary, *primaries):
            s.stop(0)
        core.close()


def test_no_endpoint_answers_unavailable(tiny_params) -> None:
    core_cfg = OrchestratorConfig(primary_target="dns:///no-such-host.invalid:1", vocab_size=TINY.vocab_size)
    orch, core = build_orchestrator(OrchestratorServiceConfig(core=core_cfg), None)
    orch.start()
    client = TandemClient(orch.address, timeout_s=30)
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate([1, 2, 3], mode="primary", max_tokens=4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no endpoints" in err.value.details()
    finally:
        client.close()
        orch.stop(0)
        core.close()
