"""The orchestrator's logic: turns a public request into SPEED rounds between the model services and a stream of
text chunks. The servicer only translates protos to and from these dataclasses."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Generator, Hashable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.clients import ModelServiceError, RemoteDrafter, RemotePrimary
from orchestrator.payoff import PayoffConfig, SpeculationPayoff, payoff_key
from orchestrator.routing import EndpointPool, Lease, NoEndpointError, Targets
from tandem.config import DEFAULT_MODE, SPECULATIVE_MODES, SamplingParams, SpecConfig
from tandem.decoding.rounds import MAX_STEPS, GenerationResult, GenerationStats, Request, run_request
from tandem.errors import InvalidRequestError, OverloadedError
from tandem.formats.text import StopStringFilter
from tandem.formats.tokenizer import Tokenizer
from tandemrpc.security import TlsFiles, open_channel
from tandemrpc.server import GRPC_OPTIONS
from tandemrpc.v1 import tandem_pb2 as pb

log = logging.getLogger("orchestrator")


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """Load-aware speculation: the most drafts per round at a given load (running requests per primary replica).

    Speculation pays off least when the primary is busiest, because a batched block verify then costs nearly as much
    per token as the plain step. At or below `full_until` requests, γ is the request's own; from `primary_only_from`
    on, requests run primary-only rounds (the drafter is let go, losslessly); in between γ shrinks linearly.
    """

    # Measured here: with the shipped drafters (about 1.44 tokens per round at γ = 1) a batched verify of drafts does
    # not pay for itself once two requests share the primary. A step of 2 rows × 2 tokens costs ~1.33x 2 rows × 1
    # token, and 3 rows run padded to 4, where 2 tokens a row cost ~1.6x one; the drafter's round comes on top. With
    # speculation down to one draft at 2 and 3 requests, tandem-speed made 0.84x and 0.74x primary's output at 2 and 3
    # streams (results/loadtest/low_concurrency_before_cpu.json); primary-only from 2 on, 1.03x and 0.99x
    # (results/loadtest/low_concurrency_cpu.json).
    full_until: int = 1
    primary_only_from: int = 2
    # From primary_only_from on, a primary-only request runs this many one-token steps per Primary call (multi-step
    # decoding; 1 = off): the same tokens with a fraction of the round trips, whose CPU the model shares on a CPU host.
    multi_step: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.full_until < self.primary_only_from:
            raise ValueError(f"need 0 <= full_until < primary_only_from, got {self}")
        if not 1 <= self.multi_step <= MAX_STEPS:
            raise ValueError(f"multi_step must lie in [1, {MAX_STEPS}], got {self.multi_step}")

    def gamma_cap(self, load: float, gamma_max: int) -> int:
        """The most drafts per round at `load` (0 = primary-only rounds)."""
        if load <= self.full_until:
            return gamma_max
        if load >= self.primary_only_from:
            return 0
        share = (self.primary_only_from - load) / (self.primary_only_from - self.full_until)
        return max(1, round(gamma_max * share))

    def steps(self, load: float) -> int:
        """One-token steps per primary-only call at `load`."""
        return self.multi_step if load >= self.primary_only_from else 1


@dataclasses.dataclass(frozen=True)
class OrchestratorConfig:
    primary_target: str = "127.0.0.1:50051"  # HOST:PORT, a comma-separated list, or dns:///HOST:PORT (routing.py)
    secondary_target: str = "127.0.0.1:50052"
    resolve_interval_s: float = 5.0  # how often dns:/// targets are re-resolved
    tls: TlsFiles | None = None  # with a CA: TLS to the model services, presenting cert/key (mutual TLS)
    vocab_size: int = 49152  # the primary's
    max_len: int = 2048  # the model services' positions per session
    max_tokens_limit: int = 1024  # most tokens one request may ask for
    gamma_max_limit: int = 16  # most drafts per round a request may ask for
    default_spec: SpecConfig = SpecConfig()
    call_timeout_s: float = 60.0  # per model-service call
    max_running: int = 16  # requests running rounds at once (per orchestrator); match the model services' slots
    max_queued: int = 16  # requests waiting for a running place; beyond it requests get RESOURCE_EXHAUSTED
    queue_timeout_s: float = 10.0  # a queued request gives up (RESOURCE_EXHAUSTED) after waiting this long
    tpot_target_ms: float | None = None  # adapt the running limit to keep time per output token near this (None: off)
    load: LoadPolicy = LoadPolicy()  # how γ shrinks as the primary's batch fills
    payoff: PayoffConfig = PayoffConfig()  # run speculative requests primary-only at load 1 where that is faster


class Admission:
    """Bounded admission: up to `limit` requests run, up to max_queued wait (first come, first served) for at most
    timeout_s, and any more are turned away at once with a retry hint.

    Without a TPOT target the limit is max_running. With one, the limit adapts to keep the time per output token of
    running requests under the target (a batched step, and every admitted request's prefill, slows every request
    running): each chunk's per-token latency feeds an exponential average, and at most once per `adjust_every_s`
    - above the target, the limit drops in proportion to the overshoot: to running · target / average (at least one
      less, never below 1), judged only once the running requests are within the limit, so a cut is not repeated
      before the requests admitted under the old limit have drained;
    - below `headroom` · target, it grows by one, but only while it binds (as many running as it allows): a limit
      that nothing has tested is not raised, so an idle server does not admit a burst at a size it never measured.
    It starts at 1 (a slow start), so the first burst of an overload is not admitted before anything was measured.
    """

    def __init__(
        self,
        max_running: int,
        max_queued: int,
        timeout_s: float,
        tpot_target_s: float | None = None,
        adjust_every_s: float = 0.5,
        headroom: float = 0.7,
    ) -> None:
        if max_running < 1 or max_queued < 0 or timeout_s < 0 or (tpot_target_s is not None and tpot_target_s <= 0):
            raise ValueError("need max_running >= 1, max_queued >= 0, queue_timeout_s >= 0 and a positive TPOT target")
        if not 0 < headroom < 1:
            raise ValueError(f"headroom must lie in (0, 1), got {headroom}")
        self.max_running, self.max_queued, self.timeout_s = max_running, max_queued, timeout_s
        self.tpot_target_s, self.adjust_every_s, self.headroom = tpot_target_s, adjust_every_s, headroom
        self.limit = max_running if tpot_target_s is None else 1
        self.tpot_s = 0.0  # the exponential average of per-token latency (with a target)
        self._adjusted = 0.0
        self._cv = threading.Condition()
        self.running = 0
        self._queue: collections.deque[object] = collections.deque()

    def observe(self, seconds: float, tokens: int) -> None:
        """A running request emitted `tokens` tokens `seconds` after its previous chunk."""
        if self.tpot_target_s is None or tokens < 1:
            return
        with self._cv:
            per_token = seconds / tokens
            self.tpot_s = per_token if self.tpot_s == 0 else 0.9 * self.tpot_s + 0.1 * per_token
            now = time.monotonic()
            if now - self._adjusted < self.adjust_every_s:
                return
            if self.tpot_s > self.tpot_target_s:
                if self.running <= self.limit and self.limit > 1:
                    fits = math.floor(self.running * self.tpot_target_s / self.tpot_s)
                    self.limit = max(1, min(self.limit - 1, fits))
                    self._adjusted = now
            elif (
                self.tpot_s < self.headroom * self.tpot_target_s
                and self.running >= self.limit
                and self.limit < self.max_running
            ):
                self.limit += 1
                self._adjusted = now
                self._cv.notify_all()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _retry_hint_s(self) -> float:
        return 1.0 + self.queued / self.limit  # about one request's time per wave ahead of the caller

    def enter(self, time_remaining_s: float | None = None) -> None:
        """Takes a running place, waiting in the queue if need be.

        Raises:
            OverloadedError: the queue is full, or no place freed up within timeout_s (or the caller's deadline).
        """
        with self._cv:
            if self.running < self.limit and not self._queue:
                self.running += 1
                return
            if len(self._queue) >= self.max_queued:
                hint = self._retry_hint_s()
                raise OverloadedError(
                    f"server busy: {self.running} requests running and {len(self._queue)} queued (the limits); "
                    f"retry in about {hint:.1f} s",
                    hint,
                )
            ticket = object()
            self._queue.append(ticket)
            wait_s = self.timeout_s if time_remaining_s is None else min(self.timeout_s, time_remaining_s)
            admitted = self._cv.wait_for(lambda: self.running < self.limit and self._queue[0] is ticket, timeout=wait_s)
            if not admitted:
                self._queue.remove(ticket)
                self._cv.notify_all()
                hint = self._retry_hint_s()
                raise OverloadedError(
                    f"server busy: no running place freed up within {wait_s:.1f} s; retry in about {hint:.1f} s", hint
                )
            self._queue.popleft()
            self.running += 1
            self._cv.notify_all()

    def leave(self) -> None:
        """Frees a running place."""
        with self._cv:
            self.running -= 1
            self._cv.notify_all()


@dataclasses.dataclass(frozen=True)
class GenerateParams:
    """A public request after decoding the proto (input still untokenized)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: tuple[tuple[str, str], ...] | None = None
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    mode: str = DEFAULT_MODE
    gamma_max: int = 0  # 0 = server default
    tau: float | None = None
    tau_first: float | None = None
    min_accepted: float | None = None
    request_id: str = ""


@dataclasses.dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" / "length" on the last chunk
    result: GenerationResult | None = None  # on the last chunk


class Metrics:
    """The orchestrator's Prometheus series (speculation counters named like vLLM's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.drafts = Counter("tandem_spec_num_drafts", "speculative rounds", registry=registry)
        self.draft_tokens = Counter("tandem_spec_num_draft_tokens", "drafted tokens", registry=registry)
        self.accepted_tokens = Counter("tandem_spec_num_accepted_tokens", "accepted drafted tokens", registry=registry)
        self.declined_rounds = Counter(
            "tandem_spec_num_declined_rounds", "rounds the router declined to draft (τ_first)", registry=registry
        )
        self.accepted_per_pos = Counter(
            "tandem_spec_num_accepted_tokens_per_pos", "accepted drafts by position", ["position"], registry=registry
        )
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "TTFT", registry=registry)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "TPOT", registry=registry)
        self.requests = Counter("tandem_requests", "finished requests", ["mode", "finish_reason"], registry=registry)
        self.running = Gauge("tandem_requests_running", "requests in flight", registry=registry)
        self.waiting = Gauge("tandem_requests_waiting", "requests queued for a running place", registry=registry)
        self.rejected = Counter(
            "tandem_requests_rejected", "requests turned away with RESOURCE_EXHAUSTED (admission)", registry=registry
        )
        self.limit = Gauge("tandem_admission_limit", "requests allowed to run at once now", registry=registry)
        self.gamma_cap = Gauge("tandem_load_gamma_cap", "most drafts per round the load allows now", registry=registry)
        self.load_shed = Counter(
            "tandem_load_shed", "requests whose speculation the load ended early", registry=registry
        )
        self.speculation_skipped = Counter(
            "tandem_speculation_skipped",
            "speculative requests run primary-only: the primary alone has been faster here (orchestrator/payoff.py)",
            registry=registry,
        )
        self.payoff_rate = Gauge(
            "tandem_payoff_seconds_per_token",
            "average seconds per output token of lone greedy requests with the default settings, by mode and path",
            ["mode", "path"],
            registry=registry,
        )
        self.drafter_fallbacks = Counter(
            "tandem_drafter_fallbacks",
            "requests finished by the primary alone after a drafter failure",
            registry=registry,
        )
        self.primary_failovers = Counter(
            "tandem_primary_failovers", "requests re-prefilled on another primary replica", registry=registry
        )
        self.endpoints = Gauge("tandem_orchestrator_endpoints", "resolved pods", ["service"], registry=registry)

    def observe(self, result: GenerationResult, finish: str, first_token_s: float) -> None:
        s = result.stats
        self.drafts.inc(s.rounds)
        self.draft_tokens.inc(s.drafted_tokens)
        self.accepted_tokens.inc(s.accepted_tokens)
        self.declined_rounds.inc(s.declined_rounds)
        for pos, n in enumerate(s.accepted_per_position):
            self.accepted_per_pos.labels(position=str(pos)).inc(n)
        self.ttft.observe(first_token_s)
        if s.output_tokens > 1:
            self.tpot.observe((s.elapsed_s - s.ttft_s) / (s.output_tokens - 1))
        self.requests.labels(mode=result.mode, finish_reason=finish).inc()
        self.drafter_fallbacks.inc(s.drafter_failures)
        self.load_shed.inc(int(s.load_shed))
        self.speculation_skipped.inc(int(s.speculation_skipped))
        self.primary_failovers.inc(s.primary_failovers)


def _serving(channel: grpc.Channel) -> bool:
    """grpc.health.v1 says SERVING within half a second."""
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _count_of(pool: EndpointPool) -> Callable[[], float]:
    return lambda: float(len(pool.addresses))


@dataclasses.dataclass
class Route:
    """The pods one request is pinned to (session affinity); a failover moves its primary side to another pod."""

    primary_lease: Lease
    primary: RemotePrimary
    deadline: float | None = None  # time.monotonic() by which the client wants the request done
    secondary_lease: Lease | None = None
    lost: list[str] = dataclasses.field(default_factory=list)  # primary pods this request lost
    admitted: Admission | None = None  # the admission place it holds until released
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def release(self) -> None:
        """Unpins the request and frees its admission place (idempotent; cancel and close may race)."""
        self.primary_lease.release()
        if self.secondary_lease is not None:
            self.secondary_lease.release()
        with self._lock:
            admitted, self.admitted = self.admitted, None
        if admitted is not None:
            admitted.leave()


class Generation:
    """One request in flight: iterate for chunks; `close()` from the consuming thread, `cancel()` from any thread.

    A cancelled or expired RPC leaves its response generator suspended (gRPC stops pulling from it), so the
    generator's own cleanup would wait for garbage collection. `cancel()` releases both sessions directly instead.
    """

    def __init__(
        self, chunks: Generator[Chunk, None, None], session: str, route: Route, drafter: RemoteDrafter | None
    ) -> None:
        self.chunks, self.session, self.route, self._drafter = chunks, session, route, drafter
        self.finished = False

    def __iter__(self) -> Generator[Chunk, None, None]:
        for chunk in self.chunks:
            yield chunk
            if chunk.finish_reason is not None:
                self.finished = True

    def close(self) -> None:
        self.chunks.close()
        if self._drafter is not None:
            self._drafter.close()  # the stream exists even if the loop never started
        self.route.release()

    def cancel(self) -> None:
        if not self.finished:
            self.route.primary.release(self.session)
            if self._drafter is not None:
                self._drafter.close()
        self.route.release()


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
                drafter = RemoteDrafter(channel, session, kind, req.sampling, req.spec, self.cfg.vocab_size, stream_s)
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
