"""Session-affine routing: which Primary and Secondary pod a request's rounds go to.

A model service's pods hold each session's KV cache, so every round of a request must reach the pod that served its
prefill. The orchestrator therefore resolves a model service to its pods itself (Kubernetes headless Service: one DNS
A record per ready pod) instead of letting a load balancer pick per call, pins each request to one endpoint for its
life, and spreads new requests over the endpoints with the fewest requests in flight.

Targets (the `--primary` / `--secondary` flags):
    HOST:PORT                 one endpoint (gRPC resolves HOST itself).
    HOST:PORT,HOST:PORT,...   a fixed list.
    dns:///HOST:PORT          every address HOST resolves to, re-resolved every `refresh_s` seconds; endpoints that
                              disappear stop taking new requests and are closed once their pinned requests finish.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable

import grpc

from tandem.errors import TandemError

log = logging.getLogger("orchestrator.routing")

Resolver = Callable[[str, int], list[str]]  # (host, port) -> ["ip:port", ...]
ChannelFactory = Callable[[str], grpc.Channel]


class NoEndpointError(TandemError):
    """A model service has no endpoint to route to (maps to UNAVAILABLE)."""


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as sorted "ip:port" strings (IPv6 in brackets)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addrs = {f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos}
    return sorted(addrs)


@dataclasses.dataclass(frozen=True)
class Targets:
    """A parsed target spec: a fixed address list, or a DNS name re-resolved periodically."""

    static: tuple[str, ...] = ()
    dns_host: str | None = None
    dns_port: int = 0

    @classmethod
    def parse(cls, spec: str) -> Targets:
        """Parses HOST:PORT, a comma-separated list of them, or dns:///HOST:PORT.

        Raises:
            ValueError: with the accepted forms, for anything else.
        """
        spec = spec.strip()
        if spec.startswith("dns:///"):
            host, sep, port = spec[len("dns:///") :].rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"target {spec!r}: expected dns:///HOST:PORT")
            return cls(dns_host=host, dns_port=int(port))
        parts = tuple(p.strip() for p in spec.split(",") if p.strip())
        if not parts or any(not p.rpartition(":")[2].isdigit() or not p.rpartition(":")[0] for p in parts):
            raise ValueError(f"target {spec!r}: expected HOST:PORT, HOST:PORT,HOST:PORT or dns:///HOST:PORT")
        return cls(static=parts)


class Endpoint:
    """One pod of a model service: its channel and the requests pinned to it."""

    def __init__(self, address: str, channel: grpc.Channel) -> None:
        self.address, self.channel = address, channel
        self.in_flight = 0
        self.draining = False  # no longer resolved: takes no new requests, closed when in_flight reaches 0
        self.down_until = 0.0  # marked down (a request saw it fail): skipped until then, then health-checked

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, in_flight={self.in_flight}{', draining' if self.draining else ''})"


class Lease:
    """A request's pin on one endpoint; `release()` is idempotent and thread-safe."""

    def __init__(self, pool: EndpointPool, endpoint: Endpoint) -> None:
        self._pool, self.endpoint = pool, endpoint
        self._released = False

    @property
    def channel(self) -> grpc.Channel:
        return self.endpoint.channel

    @property
    def address(self) -> str:
        return self.endpoint.address

    def release(self) -> None:
        self._pool._release(self)


class EndpointPool:
    """The endpoints of one model service, with least-in-flight selection and periodic re-resolution."""

    def __init__(
        self,
        name: str,
        targets: Targets,
        channel_factory: ChannelFactory,
        *,
        resolver: Resolver = resolve_dns,
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        health_check: Callable[[grpc.Channel], bool] | None = None,
        down_s: float = 2.0,
    ) -> None:
        self.name, self.targets, self._factory = name, targets, channel_factory
        self._resolver, self._refresh_s, self._clock = resolver, refresh_s, clock
        self._health_check, self._down_s = health_check, down_s
        self._lock = threading.Lock()
        self._endpoints: dict[str, Endpoint] = {}  # live (resolved) endpoints by address
        self._draining: list[Endpoint] = []
        self._next = 0  # round-robin start among equally loaded endpoints
        self._resolved_at = -float("inf")
        with self._lock:
            self._refresh_locked(force=True)

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return sorted(self._endpoints)

    def in_flight(self) -> dict[str, int]:
        """Pinned requests per address, draining endpoints included."""
        with self._lock:
            return {e.address: e.in_flight for e in (*self._endpoints.values(), *self._draining)}

    def refresh(self) -> None:
        """Re-resolves now (also done lazily by `acquire` every `refresh_s`)."""
        with self._lock:
            self._refresh_locked(force=True)

    def _refresh_locked(self, force: bool = False) -> None:
        now = self._clock()
        if self.targets.dns_host is None:
            if not self._endpoints:
                self._endpoints = {a: Endpoint(a, self._factory(a)) for a in self.targets.static}
            return
        if not force and now - self._resolved_at < self._refresh_s:
            return
        self._resolved_at = now
        try:
            addresses = set(self._resolver(self.targets.dns_host, self.targets.dns_port))
        except OSError as e:  # keep routing to what we had; DNS hiccups must not fail requests
            log.warning("%s: resolving %s failed (%s); keeping %d endpoints", self.name, self.targets.dns_host, e,
                        len(self._endpoints))  # fmt: skip
            return
        for address in sorted(set(self._endpoints) - addresses):
            gone = self._endpoints.pop(address)
            gone.draining = True
            if gone.in_flight:
                self._draining.append(gone)
            else:
                gone.channel.close()
            log.info("%s: endpoint %s left", self.name, address)
        for address in sorted(addresses - set(self._endpoints)):
            self._endpoints[address] = Endpoint(address, self._factory(address))
            log.info("%s: endpoint %s joined", self.name, address)

    def acquire(self, exclude: frozenset[str] = frozenset()) -> Lease:
        """Pins a new request to the live endpoint with the fewest requests in flight.

        Args:
            exclude: addresses not to use (endpoints a request has already lost).

        Raises:
            NoEndpointError: the service resolves to no endpoint outside `exclude` that is not marked down.
        """
        self.probe_down()
        with self._lock:
            self._refresh_locked()
            now = self._clock()
            live = sorted(
                (e for e in self._endpoints.values() if e.address not in exclude and e.down_until <= now),
                key=lambda e: e.address,
            )
            if not live:
                raise NoEndpointError(f"the {self.name} service has no endpoints ({self._describe()}); retry shortly")
            n = len(live)
            order = [live[(self._next + i) % n] for i in range(n)]
            best = min(order, key=lambda e: e.in_flight)  # first of the least loaded, rotating among ties
            self._next = (live.index(best) + 1) % n
            best.in_flight += 1
            return Lease(self, best)

    def down_state(self) -> dict[str, float]:
        """Live endpoints and the time until which each is marked down (0: up)."""
        with self._lock:
            return {a: e.down_until for a, e in self._endpoints.items()}

    def mark_down(self, address: str) -> None:
        """A request saw `address` fail: skip it for `down_s`, then probe it (see `probe_down`)."""
        with self._lock:
            e = self._endpoints.get(address)
            if e is not None:
                e.down_until = self._clock() + self._down_s

    def probe_down(self) -> None:
        """Health-checks endpoints whose down time has passed; one that still fails stays down another `down_s`."""
        with self._lock:
            due = [e for e in self._endpoints.values() if 0 < e.down_until <= self._clock()]
        for e in due:
            healthy = self._health_check is None or self._health_check(e.channel)
            with self._lock:
                e.down_until = 0.0 if healthy else self._clock() + self._down_s

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            e = lease.endpoint
            e.in_flight -= 1
            if e.draining and e.in_flight == 0 and e in self._draining:
                self._draining.remove(e)
                e.channel.close()

    def _describe(self) -> str:
        t = self.targets
        return f"dns:///{t.dns_host}:{t.dns_port}" if t.dns_host else ",".join(t.static)

    def close(self) -> None:
        with self._lock:
            for e in (*self._endpoints.values(), *self._draining):
                e.channel.close()
            self._endpoints.clear()
            self._draining.clear()
