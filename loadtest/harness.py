"""`tandem loadtest`: many concurrent streaming requests against the orchestrator, sent by virtual users on Ray.

    report = run_loadtest(LoadTestConfig(num_requests=200, rate=8.0, max_concurrency=32), prompts, target=addr)

How a run goes:

- Arrivals: request i is due sum(gaps[:i]) seconds after the run starts, the gaps gamma-distributed with shape =
  burstiness and mean 1 / rate (burstiness 1 is a Poisson process); rate 0 sends everything at once. At most
  max_concurrency requests are in flight: a due request waits for one to finish (vLLM's semaphore).
- Virtual users are Ray actors (asyncio), each holding one gRPC channel to the orchestrator; the driver hands each
  request to the user with the fewest in flight. A user times every chunk of its `Generate` stream with
  time.perf_counter from the moment it sends the request, so Ray's dispatch is not counted.
- RESOURCE_EXHAUSTED (the server's queues are full) counts as `rejected` and is not retried; any other error counts
  as `failed`. Requests cycle over the prompts.
- Before anything is measured, each mode gets a wave of unmeasured requests at every max concurrency the test uses,
  by default as many as that concurrency: the server compiles the batch shapes each level needs then, not during a
  measured run.
- With a metrics URL, the orchestrator's Prometheus counters are scraped before and after each run and their
  increases reported (`loadtest.metrics.metrics_delta`); the final chunks' stats give the same figures client-side.
- A sweep runs the whole load at each max concurrency, each mode in turn at each (interleaved). With repeats, each
  concurrency runs every mode `repeats` times, the order of the modes reversed every other pass (so drift on a shared
  machine hits them alike), and `summary` gives each mode's median over its repeats and its ratio to the first mode.

Ray: `ray_address` joins a running cluster (whose nodes need this project installed, as in its container image);
otherwise a local instance with a few CPUs, a capped object store, no dashboard and token auth off (docs/design.md,
Method) is started and shut down again. An instance already initialised in this process is used as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from benchmark.machine import machine_info
from benchmark.metrics import compiled_programs, fetch_metrics
from benchmark.report import jsonable, log_stderr
from benchmark.stack import launch_stack, wait_serving
from loadtest.metrics import (
    RequestRecord,
    metrics_delta,
    request_rows,
    spec_from_records,
    summarize,
)
from tandem.config import DEFAULT_MODE, MODES

SCHEMA = "tandem-loadtest/1"
Prompt = str | Sequence[int] | Sequence[dict[str, str]]  # text, token ids or chat messages (tandemrpc's forms)
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class LoadTestConfig:
    """One load test: the load, what each request asks for, and how it is judged.

    Attributes:
        num_requests: requests per run.
        rate: mean arrivals per second; 0 sends every request at once (bounded by max_concurrency).
        burstiness: gamma shape of the gaps between arrivals: 1 = Poisson, < 1 burstier, > 1 steadier.
        max_concurrency: most requests in flight (None: num_requests).
        modes: engine modes; several run one after another (interleaved with the sweep).
        max_tokens: tokens asked of each request.
        sweep: max concurrencies to run the whole load at (empty: one run at max_concurrency).
        slo_ttft_ms: goodput counts requests with TTFT at most this (None: no TTFT SLO).
        slo_tpot_ms: goodput counts requests with TPOT at most this (None: no TPOT SLO).
        seed: seeds the arrival gaps.
        users: virtual users (Ray actors, one gRPC channel each) the requests are spread over.
        warmup_requests: unmeasured requests per mode and max concurrency, sent before the runs (None: the max
            concurrency, at most num_requests; 0: none).
        timeout_s: deadline of each request (None: none).
        repeats: runs of every mode at each max concurrency (see `schedule`).
    """

    num_requests: int = 100
    rate: float = 0.0
    burstiness: float = 1.0
    max_concurrency: int | None = None
    modes: tuple[str, ...] = (DEFAULT_MODE,)
    max_tokens: int = 128
    sweep: tuple[int, ...] = ()
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    users: int = 2
    warmup_requests: int | None = None
    timeout_s: float | None = 600.0
    repeats: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            raise ValueError(f"modes must be some of {', '.join(MODES)}, got {', '.join(self.modes) or 'none'}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes repeat: {', '.join(self.modes)}")
        if self.num_requests < 1 or self.max_tokens < 1 or self.users < 1 or self.repeats < 1:
            raise ValueError("num_requests, max_tokens, users and repeats must be >= 1")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0 (0: all at once), got {self.rate}")
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if any(c < 1 for c in (*self.sweep, self.max_concurrency or 1)):
            raise ValueError("max concurrencies must be >= 1")
        if self.sweep and self.max_concurrency is not None:
            raise ValueError("give max_concurrency or a sweep of them, not both")
        if any(s is not None and s <= 0 for s in (self.slo_ttft_ms, self.slo_tpot_ms, self.timeout_s)):
            raise ValueError("SLOs and timeout_s must be > 0")
        if self.warmup_requests is not None and self.warmup_requests < 0:
            raise ValueError("warmup_requests must be >= 0")

    @property
    def is_sweep(self) -> bool:
        """Several runs (a sweep, several modes or repeats): the report lists them under `sweep`."""
        return bool(self.sweep) or len(self.modes) > 1 or self.repeats > 1

    @property
    def concurrencies(self) -> tuple[int, ...]:
        """The max concurrencies the load runs at (no limit: every request at once)."""
        return self.sweep or (self.max_concurrency or self.num_requests,)

    def points(self) -> list[tuple[str, int]]:
        """Each distinct (mode, max concurrency): every mode at one concurrency, then the next."""
        return [(mode, c) for c in self.concurrencies for mode in self.modes]

    def schedule(self) -> list[tuple[str, int, int]]:
        """(mode, max concurrency, repeat) of each run, in the order they run: at each concurrency, `repeats` passes
        over the modes, every other pass in reverse order (A B B A ...)."""
        return [
            (mode, c, r)
            for c in self.concurrencies
            for r in range(self.repeats)
            for mode in (self.modes if r % 2 == 0 else self.modes[::-1])
        ]


def arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n gaps in seconds between arrivals: request i is due sum(gaps[:i]) after the start (the last gap is unused).

    Gamma-distributed with shape `burstiness` and scale 1 / (rate · burstiness): mean 1 / rate, coefficient of
    variation 1 / sqrt(burstiness). rate 0: all zero (everything at once).
    """
    if rate == 0:
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


def chat_prompts(rows: Sequence[tuple[str, str]]) -> list[Prompt]:
    """benchmark.prompts.read_prompts' (prompt, category) rows as user messages: the orchestrator renders them with the
    chat template, giving the token ids `tandem bench` sends."""
    return [[{"role": "user", "content": text}] for text, _ in rows]


# -- the virtual user (a Ray actor) --------------------------------------------------------------------------------


async def stream_one(client: Any, index: int, prompt: Prompt, **params: Any) -> RequestRecord:
    """Sends one Generate call and times its chunks; every failure becomes a record, never an exception.

    Args:
        client: a tandemrpc.client.AsyncTandemClient.
        index: the request's number in its run.
        prompt: text, token ids or chat messages.
        params: tandemrpc.client.build_request's keywords (mode, max_tokens, ...).
    """
    import grpc

    from tandemrpc.client import stats_from_response
    from tandemrpc.convert import FINISH_NAMES
    from tandemrpc.v1 import tandem_pb2 as pb

    chunk_s: list[float] = []
    chunk_tokens: list[int] = []
    final: Any = None
    last = 0.0
    start = time.perf_counter()
    try:
        async for chunk in client.generate(prompt, **params):
            last = time.perf_counter() - start
            if chunk.token_ids:
                chunk_s.append(last)
                chunk_tokens.append(len(chunk.token_ids))
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                final = chunk
    except grpc.RpcError as e:  # grpc.aio's errors are grpc.RpcErrors with a code and details
        rejected = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return RequestRecord(
            index, "rejected" if rejected else "failed", tuple(chunk_s), tuple(chunk_tokens),
            error=f"{e.code().name}: {e.details()}",
        )  # fmt: skip
    except Exception as e:  # a load test counts every failure and goes on
        return RequestRecord(index, "failed", tuple(chunk_s), tuple(chunk_tokens), error=f"{type(e).__name__}: {e}")
    if final is None:
        error = "the stream ended without its final chunk"
        return RequestRecord(index, "failed", tuple(chunk_s), tuple(chunk_tokens), error=error)
    stats = stats_from_response(final)
    return RequestRecord(
        index,
        "completed",
        tuple(chunk_s),
        tuple(chunk_tokens),
        e2el_s=last,
        finish_reason=FINISH_NAMES.get(final.finish_reason, str(final.finish_reason)),
        rounds=stats["rounds"],
        drafted_tokens=stats["drafted_tokens"],
        accepted_tokens=stats["accepted_tokens"],
        accepted_per_position=tuple(stats["accepted_per_position"]),
    )


class VirtualUser:
    """A Ray actor's body (asyncio): one gRPC channel to the orchestrator, many concurrent Generate streams.

    Args:
        target: the orchestrator's HOST:PORT.
        timeout_s: deadline of each request.
    """

    def __init__(self, target: str, timeout_s: float | None) -> None:
        self.target, self.timeout_s = target, timeout_s
        self.client: Any = None  # opened in the actor's event loop, where grpc.aio needs it

    async def ready(self) -> bool:
        return True

    async def generate(self, index: int, prompt: Prompt, params: Mapping[str, Any]) -> RequestRecord:
        if self.client is None:
            from tandemrpc.client import AsyncTandemClient

            self.client = AsyncTandemClient(self.target, timeout_s=self.timeout_s)
        return await stream_one(self.client, index, prompt, **params)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SystemExit("the load test needs Ray: pip install '.[loadtest]'") from None
    return ray


# Ray raises a bare Exception with this text when its local node does not register within its fixed 30 s (seen once
# in a full test run on this 2-core machine, where the same start took seconds before and after).
_NODE_START_TIMEOUT = "timed out during startup"


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int = 2,
    object_store_mb: int = 128,
    start_attempts: int = 2,
    log: Callable[[str], None] = log_stderr,
) -> Iterator[Any]:
    """Yields the ray module, initialised: joined to `address`, or a local instance started (and shut down) here.

    An instance this process already initialised is used as it is and left running. A local instance whose node
    times out while starting is started again, up to `start_attempts` times in all.
    """
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth is on by default since Ray 2.5x
        for attempt in range(1, start_attempts + 1):
            try:
                ray.init(
                    # "local": a new instance even where an earlier `ray start` left its address behind in the
                    # temporary directory (ray.init() would try to join that cluster, dead or alive).
                    address="local",
                    num_cpus=num_cpus,
                    object_store_memory=object_store_mb * 2**20,
                    include_dashboard=False,
                    log_to_driver=False,
                )
                break
            except Exception as e:
                if _NODE_START_TIMEOUT not in str(e) or attempt == start_attempts:
                    raise
                log(f"local Ray node did not start in time ({attempt} of {start_attempts}); starting it again")
                ray.shutdown()
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def start_users(ray: Any, target: str, n: int, max_in_flight: int, timeout_s: float | None) -> list[Any]:
    """n VirtualUser actors, spread over the cluster's nodes, each started (its process up) before returning."""
    actor = ray.remote(VirtualUser).options(
        num_cpus=0, max_concurrency=max(1, max_in_flight), scheduling_strategy="SPREAD"
    )
    users = [actor.remote(target, timeout_s) for _ in range(n)]
    ray.get([u.ready.remote() for u in users])
    return users


# -- the driver ---------------------------------------------------------------------------------------------------


def drive(
    ray: Any,
    users: Sequence[Any],
    prompts: Sequence[Prompt],
    params: Mapping[str, Any],
    gaps: Sequence[float],
    max_concurrency: int,
    on_done: Callable[[RequestRecord], object] = lambda r: None,
) -> tuple[list[RequestRecord], float]:
    """Sends len(gaps) requests on the arrival schedule the gaps give, at most max_concurrency in flight.

    Returns:
        The records, in the order they finished, and the run's duration (first request sent → last one done).
    """
    pending: dict[Any, int] = {}  # ObjectRef -> the user running it
    load = [0] * len(users)
    records: list[RequestRecord] = []

    def collect(timeout: float | None) -> None:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        for ref in done:
            load[pending.pop(ref)] -= 1
            records.append(ray.get(ref))
            on_done(records[-1])

    start = time.perf_counter()
    due = 0.0
    for i in range(len(gaps)):
        due += gaps[i - 1] if i else 0.0
        while (wait := start + due - time.perf_counter()) > 0:
            if pending:
                collect(wait)  # returns early when a request finishes, so progress and load stay current
            else:
                time.sleep(wait)
        while len(pending) >= max_concurrency:
            collect(None)
        u = min(range(len(users)), key=load.__getitem__)
        load[u] += 1
        pending[users[u].generate.remote(i, prompts[i % len(prompts)], params)] = u
    while pending:
        collect(None)
    return records, time.perf_counter() - start


def _scrape(metrics_url: str | None, log: Log) -> str | None:
    if metrics_url is None:
        return None
    try:
        return fetch_metrics(metrics_url)
    except OSError as e:
        log(f"cannot read {metrics_url}: {e}; no server-side speculation counters for this run")
        return None


def _compiled(urls: Sequence[str], log: Log) -> float | None:
    """The programs the model services at `urls` have compiled so far (None: no URLs, or one cannot be read)."""
    try:
        return sum(compiled_programs(u) for u in urls) if urls else None
    except OSError as e:
        log(f"cannot read the model services' metrics: {e}; compiles during the runs are not checked")
        return None


def warm_up(ray: Any, users: Sequence[Any], cfg: LoadTestConfig, prompts: Sequence[Prompt], log: Log) -> None:
    """Unmeasured requests before the runs, for every mode at every max concurrency the test will use (each level
    batches differently, so each compiles its own shapes): a wave of that many requests (cfg.warmup_requests, if
    given, instead), sent at once under that concurrency."""
    for mode, concurrency in cfg.points():
        n = min(concurrency, cfg.num_requests) if cfg.warmup_requests is None else cfg.warmup_requests
        if not n:
            continue
        params = {"mode": mode, "max_tokens": cfg.max_tokens}
        records, _ = drive(ray, users, prompts, params, [0.0] * n, concurrency)
        bad = [r.error for r in records if r.outcome != "completed"]
        log(
            f"warm-up {mode} at max concurrency {concurrency}: {len(records) - len(bad)}/{len(records)} completed"
            + (f"; {bad[0]}" if bad else "")
        )


def measure(
    ray: Any,
    users: Sequence[Any],
    cfg: LoadTestConfig,
    prompts: Sequence[Prompt],
    mode: str,
    max_concurrency: int,
    *,
    metrics_url: str | None = None,
    service_metrics: Sequence[str] = (),
    progress: bool = True,
    log: Log = log_stderr,
) -> dict[str, Any]:
    """One measured run: `loadtest.metrics.summarize`'s figures plus mode, max_concurrency, rate, burstiness,
    num_requests, spec, server_counters and primary_only (from the metrics URL, else None), compiled_during_run (the
    programs the model services at `service_metrics` compiled meanwhile: nonzero means requests waited for compiles;
    None without them), spec_responses (from the final chunks) and requests (`loadtest.metrics.request_rows`)."""
    from tqdm import tqdm

    params = {"mode": mode, "max_tokens": cfg.max_tokens}
    gaps = arrival_gaps(cfg.num_requests, cfg.rate, cfg.burstiness, cfg.seed)
    before = _scrape(metrics_url, log)
    compiled_before = _compiled(service_metrics, log)
    with tqdm(total=cfg.num_requests, desc=f"{mode} c={max_concurrency}", unit="req", disable=not progress) as bar:
        records, duration = drive(ray, users, prompts, params, gaps, max_concurrency, on_done=lambda r: bar.update())
    after = _scrape(metrics_url, log) if before is not None else None
    server = metrics_delta(before, after) if before is not None and after is not None else {}
    compiled_after = _compiled(service_metrics, log) if compiled_before is not None else None
    compiled = None if compiled_after is None or compiled_before is None else int(compiled_after - compiled_before)
    if compiled:
        log(f"warning: the model services compiled {compiled} programs during this run: requests waited for them")
    summary = summarize(records, duration, slo_ttft_ms=cfg.slo_ttft_ms, slo_tpot_ms=cfg.slo_tpot_ms)
    log(
        f"{mode} at max concurrency {max_concurrency}: {summary['completed']} completed, {summary['rejected']} "
        f"rejected, {summary['failed']} failed in {duration:.1f}s"
    )
    return {
        "mode": mode,
        "max_concurrency": max_concurrency,
        "rate": cfg.rate,
        "burstiness": cfg.burstiness,
        "num_requests": cfg.num_requests,
        **summary,
        "spec": server.get("spec"),
        "server_counters": server.get("server_counters"),
        "primary_only": server.get("primary_only"),
        "compiled_during_run": compiled,
        "spec_responses": spec_from_records(records),
        "requests": request_rows(records),
    }


def summarize_repeats(runs: Sequence[Mapping[str, Any]], modes: Sequence[str]) -> list[dict[str, Any]]:
    """Per max concurrency and mode: the medians over repeats of output throughput and p99 TPOT, the run count, and
    `ratio_to_first`: the median over repeats of the mode's throughput ÷ the first mode's in the same repeat (each
    such pair ran back to back, so drift between repeats cancels); None for the first mode."""
    out = []
    for c in dict.fromkeys(r["max_concurrency"] for r in runs):
        here = [r for r in runs if r["max_concurrency"] == c]
        by_repeat = {r.get("repeat", 0): r["output_throughput"] for r in here if r["mode"] == modes[0]}
        for mode in modes:
            mine = [r for r in here if r["mode"] == mode]
            if not mine:
                continue
            p99 = [r["tpot"]["p99"] for r in mine if r["tpot"]["p99"] is not None]
            paired = [
                r["output_throughput"] / by_repeat[r.get("repeat", 0)]
                for r in mine
                if by_repeat.get(r.get("repeat", 0))
            ]
            out.append(
                {
                    "max_concurrency": c,
                    "mode": mode,
                    "runs": len(mine),
                    "output_throughput": statistics.median(r["output_throughput"] for r in mine),
                    "output_throughputs": [r["output_throughput"] for r in mine],
                    "tpot_p99": statistics.median(p99) if p99 else None,
                    "ratio_to_first": statistics.median(paired) if mode != modes[0] and paired else None,
                }
            )
    return out


def run_loadtest(
    cfg: LoadTestConfig,
    prompts: Sequence[Prompt],
    *,
    target: str | None = None,
    metrics_url: str | None = None,
    service_metrics: Sequence[str] = (),
    ray_address: str | None = None,
    slots: int = 16,
    max_len: int = 2048,
    startup_timeout_s: float = 600.0,
    args: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Log = log_stderr,
) -> dict[str, Any]:
    """Runs the load test and returns its report.

    Args:
        cfg: the load and how it is judged.
        prompts: cycled over the requests.
        target: the orchestrator's HOST:PORT; None: a ServeStack is started here (`slots`, `max_len`) and stopped at
            the end, its orchestrator's metrics URL used unless `metrics_url` is given.
        metrics_url: the orchestrator's Prometheus endpoint, scraped around each run (None: no server counters).
        service_metrics: the model services' Prometheus endpoints, scraped around each run for compiles (a stack
            started here: its own).
        ray_address: a Ray cluster to join (None: a local instance).
        slots, max_len, startup_timeout_s: the started stack's (unused with a target).
        args: the command line's arguments, recorded in the report.
        progress: a progress bar of finished requests per run.
        log: progress lines.

    Returns:
        A JSON-able dict: schema, args, config, machine, target, server ("given" or the started stack), metrics_url,
        latency_unit ("ms"); then one run's figures (`measure`) at the top level, or, for a sweep or several modes,
        sweep: [each run's figures, in the order they ran].

    Raises:
        ValueError: no prompts.
        tandemrpc.launch.ServeError: the stack started here did not come up.
    """
    if not prompts:
        raise ValueError("no prompts")
    points = cfg.points()
    stack = (
        launch_stack(slots=slots, max_len=max_len, startup_timeout_s=startup_timeout_s, log=log) if not target else None
    )
    try:
        with ray_session(ray_address) as ray:  # Ray starts while the stack's models load
            if stack is not None:
                target = wait_serving(stack, log)
                metrics_url = metrics_url or stack.metrics_urls["orchestrator"]
                service_metrics = [stack.metrics_urls[name] for name in ("primary", "secondary")]
            assert target is not None
            users = start_users(ray, target, cfg.users, max(c for _, c in points), cfg.timeout_s)
            try:
                warm_up(ray, users, cfg, prompts, log)
                runs = [
                    measure(
                        ray,
                        users,
                        cfg,
                        prompts,
                        mode,
                        c,
                        metrics_url=metrics_url,
                        service_metrics=service_metrics,
                        progress=progress,
                        log=log,
                    )
                    | {"repeat": r}
                    for mode, c, r in cfg.schedule()
                ]
            finally:
                for u in users:
                    ray.kill(u)
    finally:
        if stack is not None:
            stack.stop()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "args": jsonable(dict(args or {})),
        "config": jsonable(dataclasses.asdict(cfg)),
        "machine": machine_info(),
        "target": target,
        "server": "given" if stack is None else f"ServeStack(slots={slots}, max_len={max_len}) started here",
        "metrics_url": metrics_url,
        "latency_unit": "ms",
    }
    if cfg.is_sweep:
        report["sweep"] = runs
        report["summary"] = summarize_repeats(runs, cfg.modes)
    else:
        report.update(runs[0])
    return report
