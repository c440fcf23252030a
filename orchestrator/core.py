"""The Orchestrator: turns a public request into SPEED rounds between the model services and a stream of text
chunks: admission, pinning to a primary and a Secondary pod, load-aware and payoff-aware speculation, failover, the
request loop (`tandem.decoding.rounds.run_request` over the remote adapters), metrics and the request log line. The
servicer only translates protos to and from the dataclasses of `orchestrator.generation`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Generator, Hashable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from orchestrator.admission import Admission
from orchestrator.clients import ModelServiceError, RemoteDrafter, RemotePrimary
from orchestrator.config import OrchestratorConfig
from orchestrator.generation import Chunk, GenerateParams, Generation, Route
from orchestrator.metrics import Metrics
from orchestrator.payoff import SpeculationPayoff, payoff_key
from orchestrator.routing import EndpointPool, Lease, NoEndpointError, Targets
from tandem.config import SPECULATIVE_MODES, SamplingParams, SpecConfig
from tandem.decoding.rounds import GenerationResult, GenerationStats, Request, run_request
from tandem.errors import InvalidRequestError, OverloadedError
from tandem.formats.text import StopStringFilter
from tandem.formats.tokenizer import Tokenizer
from tandemrpc.security import open_channel
from tandemrpc.server import GRPC_OPTIONS
from tandemrpc.v1 import tandem_pb2 as pb

log = logging.getLogger("orchestrator")


def _serving(channel: grpc.Channel) -> bool:
    """grpc.health.v1 says SERVING within half a second."""
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _count_of(pool: EndpointPool) -> Callable[[], float]:
    return lambda: float(len(pool.addresses))


class Orchestrator:
    """Runs public requests over the Primary and Secondary services."""

    def __init__(self, cfg: OrchestratorConfig, tokenizer: Tokenizer | None, registry: CollectorRegistry) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer

        def channel(address: str) -> grpc.Channel:
            return open_channel(address, cfg.tls, GRPC_OPTIONS)

        self.pools = {
            name: EndpointPool(
                name, Targets.parse(target), channel, refresh_s=cfg.resolve_interval_s, health_check=_serving
            )
            for name, target in (("primary", cfg.primary_target), ("secondary", cfg.secondary_target))
        }
        self.metrics = Metrics(registry)
        for name, pool in self.pools.items():
            self.metrics.endpoints.labels(service=name).set_function(_count_of(pool))
        target = None if cfg.tpot_target_ms is None else cfg.tpot_target_ms / 1000
        self.admission = Admission(cfg.max_running, cfg.max_queued, cfg.queue_timeout_s, target)
        self.metrics.limit.set_function(lambda: float(self.admission.limit))
        self.metrics.waiting.set_function(lambda: float(self.admission.queued))
        self.metrics.gamma_cap.set_function(lambda: float(self._gamma_cap(cfg.default_spec.gamma_max)))
        self.stop_token_ids = frozenset(tokenizer.stop_token_ids) if tokenizer else frozenset()
        self.payoff = SpeculationPayoff(cfg.payoff)
        for mode in SPECULATIVE_MODES:
            for path, speculated in (("speculative", True), ("primary-only", False)):
                key = payoff_key(mode, SamplingParams(), cfg.default_spec, speculated)
                self.metrics.payoff_rate.labels(mode=mode, path=path).set_function(self._payoff_rate(key))

    def _payoff_rate(self, key: Hashable) -> Callable[[], float]:
        return lambda: self.payoff.rate(key) or math.nan

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def _drafter_reachable(self) -> bool:
        """False while every Secondary endpoint is marked down after a failure: requests then run on the primary
        alone (lossless) instead of each paying a failed connection; endpoints are health-checked back in."""
        pool = self.pools["secondary"]
        pool.probe_down()
        return bool(pool.addresses) and any(n == 0 for n in pool.down_state().values())

    def _load(self, replica_sessions: int = 0) -> float:
        """Running requests per primary replica.

        This orchestrator's running requests spread over the replicas are all it knows before a request's first
        primary step; from then on the request's replica reports its open sessions (`replica_sessions`), which
        count every orchestrator's requests on it, and the larger of the two is the load.
        """
        replicas = max(1, len(self.pools["primary"].addresses))
        return max(self.admission.running / replicas, replica_sessions)

    def _gamma_cap(self, gamma_max: int, replica_sessions: int = 0) -> int:
        """The most drafts per round at the current load."""
        return self.cfg.load.gamma_cap(self._load(replica_sessions), gamma_max)

    def _pin(self, service: str) -> Lease:
        try:
            return self.pools[service].acquire()
        except NoEndpointError as e:
            raise ModelServiceError(service, grpc.StatusCode.UNAVAILABLE, str(e)) from None

    def _prompt_ids(self, p: GenerateParams) -> tuple[int, ...]:
        if p.token_ids is not None:
            return p.token_ids
        if self.tokenizer is None:
            raise InvalidRequestError("this server has no tokenizer; send token_ids")
        if p.chat is not None:
            if not p.chat:
                raise InvalidRequestError("the chat has no messages")
            text = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in p.chat])
            return tuple(self.tokenizer.encode(text))
        return tuple(self.tokenizer.encode(p.text or ""))

    def _spec(self, p: GenerateParams) -> SpecConfig:
        d = self.cfg.default_spec
        if not 0 <= p.gamma_max <= self.cfg.gamma_max_limit:
            raise InvalidRequestError(f"gamma_max must lie in [0, {self.cfg.gamma_max_limit}], got {p.gamma_max}")
        try:
            return SpecConfig(
                gamma_max=p.gamma_max or d.gamma_max,
                tau=d.tau if p.tau is None else p.tau,
                draft_top_k=d.draft_top_k,
                tau_first=d.tau_first if p.tau_first is None else p.tau_first,
                min_accepted=d.min_accepted if p.min_accepted is None else p.min_accepted,
                pause_steps=d.pause_steps,
                lookup_ngram=d.lookup_ngram if p.lookup_ngram is None else p.lookup_ngram,
            )
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None

    def generate(self, p: GenerateParams, time_remaining_s: float | None = None) -> Generation:
        """Validates now; the returned Generation yields chunks (see Generation for cancellation).

        Args:
            p: the request.
            time_remaining_s: the client's deadline, if any; every model-service call is cut to it.
        """
        if len(p.stop) > 16 or any(len(s) > 256 for s in p.stop):
            raise InvalidRequestError("at most 16 stop strings of at most 256 characters each")
        req = Request(self._prompt_ids(p), p.mode, p.max_tokens, p.sampling, self._spec(p))
        limit = req.validate(self.cfg.vocab_size, self.cfg.max_len, self.cfg.max_tokens_limit)
        session = uuid.uuid4().hex
        try:
            self.admission.enter(time_remaining_s)
        except OverloadedError:
            self.metrics.rejected.inc()
            raise
        # Session affinity: every round of this request goes to these two pods, which hold its caches.
        deadline = None if time_remaining_s is None else time.monotonic() + time_remaining_s
        try:
            lease = self._pin("primary")
        except BaseException:
            self.admission.leave()
            raise
        route = Route(lease, RemotePrimary(lease.channel, self.cfg.vocab_size, self.cfg.call_timeout_s, deadline))
        route.deadline = deadline
        route.admitted = self.admission
        drafter = None
        # Load-aware speculation decided at the start too: a request that would drop its drafter before its first
        # round never opens a drafter stream, and its prefill sends no primary states.
        speculative = req.mode in SPECULATIVE_MODES
        shed = speculative and self._gamma_cap(req.spec.gamma_max) == 0
        # Alone on the primary, where the primary alone has been the faster here, it runs primary-only the same way.
        skipped = speculative and not shed and not self.payoff.speculate(req.mode, req.sampling, req.spec)
        try:
            if req.mode != "primary" and not shed and not skipped and self._drafter_reachable():
                route.secondary_lease = self._pin("secondary")
                kind = pb.DRAFTER_TANDEM if req.mode.startswith("tandem") else pb.DRAFTER_VANILLA
                channel = route.secondary_lease.channel
                stream_s = 600.0 if time_remaining_s is None else min(600.0, time_remaining_s)
                drafter = RemoteDrafter(
                    channel, session, kind, req.sampling, req.drafter_spec, self.cfg.vocab_size, stream_s
                )
        except BaseException:
            route.release()
            raise
        stats = GenerationStats(load_shed=shed, speculation_skipped=skipped)
        return Generation(self._run(p, req, limit, session, route, drafter, stats), session, route, drafter)

    def _failover(self, route: Route) -> RemotePrimary:
        """Moves a request whose primary pod is unreachable to another pod (the request loop re-prefills there)."""
        route.lost.append(route.primary_lease.address)
        route.primary_lease.release()
        try:
            lease = self.pools["primary"].acquire(exclude=frozenset(route.lost))
        except NoEndpointError:
            lost = ", ".join(route.lost)
            raise ModelServiceError(
                "primary", grpc.StatusCode.UNAVAILABLE, f"lost primary replica(s) {lost} and no other one is left"
            ) from None
        log.warning("request moved from primary %s to %s", route.lost[-1], lease.address)
        route.primary_lease = lease
        route.primary = RemotePrimary(lease.channel, self.cfg.vocab_size, self.cfg.call_timeout_s, route.deadline)
        return route.primary

    def _run(
        self,
        p: GenerateParams,
        req: Request,
        limit: int,
        session: str,
        route: Route,
        drafter: RemoteDrafter | None,
        stats: GenerationStats,
    ) -> Generator[Chunk, None, None]:
        busiest = 0  # the most sessions the request's replica reported (1: this request alone)

        def seen(sessions: int) -> int:
            nonlocal busiest
            busiest = max(busiest, sessions)
            return sessions

        rounds = run_request(
            req,
            session,
            route.primary,
            drafter,
            max_tokens=limit,
            stop_token_ids=self.stop_token_ids,
            stats=stats,
            failover=lambda: self._failover(route),
            gamma_cap=lambda sessions: self._gamma_cap(req.spec.gamma_max, seen(sessions)),
            primary_steps=lambda sessions: self.cfg.load.steps(self._load(seen(sessions))),
        )
        decoder = self.tokenizer.incremental_decoder(skip_special_tokens=True) if self.tokenizer else None
        stops = StopStringFilter(p.stop)
        start, first_s = time.perf_counter(), 0.0
        last = start
        self.metrics.running.inc()
        try:
            while True:
                try:
                    tokens = next(rounds)
                except StopIteration as done:
                    result: GenerationResult = done.value
                    break
                now = time.perf_counter()
                if first_s:  # decode latency only (a prefill's is TTFT): what the admission limit adapts to
                    self.admission.observe(now - last, len(tokens))
                last = now
                first_s = first_s or now - start
                text = stops.push(decoder.push(tokens)) if decoder else ""
                if stops.stopped:  # a stop string: end the rounds now, which releases both sessions
                    rounds.close()
                    result = GenerationResult([], "stop", stats, req.mode)
                yield Chunk(text, tokens)
                if stops.stopped:
                    break
            tail = stops.push(decoder.flush()) + stops.flush() if decoder and not stops.stopped else ""
            self._record(p, req, session, result, first_s, time.perf_counter() - start, route)
            self.payoff.observe(req.mode, req.sampling, req.spec, stats, alone=busiest <= 1)
            yield Chunk(tail, [], result.finish_reason, result)
        finally:
            self.metrics.running.dec()
            rounds.close()  # releases both sessions if the loop ran
            if stats.drafter_failures and route.secondary_lease is not None:
                self.pools["secondary"].mark_down(route.secondary_lease.address)
            route.release()

    def _record(
        self,
        p: GenerateParams,
        req: Request,
        session: str,
        result: GenerationResult,
        first_s: float,
        latency_s: float,
        route: Route,
    ) -> None:
        """Metrics and the one structured log line per request."""
        self.metrics.observe(result, result.finish_reason, first_s)
        s = result.stats
        line = {
            "event": "request",
            "request_id": p.request_id or session,
            "mode": req.mode,
            "prompt_tokens": len(req.prompt_ids),
            "output_tokens": s.output_tokens,
            "rounds": s.rounds,
            "declined_rounds": s.declined_rounds,
            "lookup_rounds": s.lookup_rounds,
            "acceptance_rate": round(s.acceptance_rate, 4),
            "mean_acceptance_length": round(s.mean_acceptance_length, 4),
            "ttft_s": round(first_s, 4),
            "latency_s": round(latency_s, 4),
            "primary": route.primary_lease.address,
            "secondary": route.secondary_lease.address if route.secondary_lease else None,
            "finish_reason": result.finish_reason,
            "speculation_skipped": s.speculation_skipped,
            "drafter_failures": s.drafter_failures,
            "primary_failovers": s.primary_failovers,
        }
        log.info(json.dumps(line))
