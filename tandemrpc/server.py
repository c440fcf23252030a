"""What every Tandem service shares: error -> status mapping and a server lifecycle object that tests start
in-process on a free loopback port (health service, reflection, Prometheus endpoint, message size limits)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tandem.config import BatchingConfig
from tandem.errors import (
    InvalidRequestError,
    PoolExhaustedError,
    PrimaryUnavailableError,
    SessionNotFoundError,
    SessionStateError,
    TandemError,
)
from tandemrpc.security import TlsFiles, server_credentials

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # a prefill's states for a 4k-token prompt are ~28 MB of float32 on SmolLM2

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

_STATUS = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SessionStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (PoolExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PrimaryUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a library error maps to (INTERNAL for anything unexpected)."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def translate_errors(method: F) -> F:
    """Wraps a unary servicer method: library errors abort the call with their status and message."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except TandemError as e:
            context.abort(status_for(e), str(e))
        except Exception as e:  # a bug: say so, keep serving others
            log.exception("internal error in %s", method.__qualname__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    return wrapper  # type: ignore[return-value]


class ServiceServer:
    """Lifecycle of one gRPC service: start() / stop(grace) / wait().

    Args:
        register: adds the service's servicers to a grpc.Server.
        service_names: full names of the registered services (health and reflection list them).
        host, port: where to listen; port 0 picks a free one (read `port` after start()).
        metrics_port: Prometheus endpoint port (None: no endpoint, 0: a free one).
        registry: the metrics registry the service writes to.
        max_workers: handler threads.
        housekeeping: (interval_s, fn) pairs run on a background thread while serving (session expiry).
        tls: serve TLS (mutual TLS when it has a CA) instead of plaintext.
        interceptors: server interceptors (e.g. bearer-token authentication).
    """

    def __init__(
        self,
        register: Callable[[grpc.Server], None],
        service_names: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_port: int | None = None,
        registry: CollectorRegistry | None = None,
        max_workers: int = 32,
        housekeeping: Sequence[tuple[float, Callable[[], object]]] = (),
        tls: TlsFiles | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently share its traffic.
        options = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers), options=options, interceptors=list(interceptors)
        )
        register(self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.service_names = tuple(service_names)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.host = host
        if tls is not None and tls.serves_tls:
            self.port = self._server.add_secure_port(f"{host}:{port}", server_credentials(tls))
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {host}:{port}")
        self._metrics_port, self.registry = metrics_port, registry or CollectorRegistry()
        self._metrics_http: Any = None
        self.metrics_port: int | None = None
        self._housekeeping = tuple(housekeeping)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ServiceServer:
        self._server.start()
        if self._metrics_port is not None:
            self._metrics_http, _ = start_http_server(self._metrics_port, addr=self.host, registry=self.registry)
            self.metrics_port = int(self._metrics_http.server_port)
        for interval, fn in self._housekeeping:
            t = threading.Thread(target=self._every, args=(interval, fn), daemon=True)
            t.start()
            self._threads.append(t)
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def _every(self, interval: float, fn: Callable[[], object]) -> None:
        while not self._stopping.wait(interval):
            try:
                fn()
            except Exception:
                log.exception("housekeeping task failed")

    def stop(self, grace: float | None = 1.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def serve_until_signalled(self, grace: float = 5.0) -> None:
        """Blocks until SIGTERM or SIGINT, then stops gracefully (what a container entrypoint wants)."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        self.stop(grace)


def add_batching_flags(parser: Any, env_prefix: str) -> None:
    """The model services' continuous-batching flags (`tandem.config.BatchingConfig`), each an env var too."""
    env = os.environ.get
    parser.add_argument(
        "--max-batch",
        type=int,
        default=int(env(f"{env_prefix}_MAX_BATCH", "16")),
        help="most sessions' calls in one batched model call",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=float(env(f"{env_prefix}_BATCH_WINDOW_MS", "40")),  # BatchingConfig.window_s (why: see there)
        help="how long an idle model waits for other live sessions' calls before running a batch",
    )


def add_process_gauges(
    registry: CollectorRegistry, service: str, maps: Callable[[], int | None], programs: Callable[[], int]
) -> None:
    """A model service's warm-up gauges (`tandem.decoding.warmup`): its memory maps (against vm.max_map_count) and the
    programs it has compiled or loaded (monotonic: a rise after SERVING is a request that waited for a compile)."""
    used = Gauge(
        f"tandem_{service}_memory_maps", "memory maps this process holds (vm.max_map_count bounds)", registry=registry
    )
    used.set_function(lambda: maps() or 0)
    compiled = Gauge(
        f"tandem_{service}_compiled_programs",
        "XLA programs compiled or loaded from the cache (monotonic)",
        registry=registry,
    )
    compiled.set_function(programs)


def add_compile_flag(parser: Any) -> None:
    """The model services' `--compile-at-start` (env TANDEM_COMPILE_AT_START, shared by both services)."""
    parser.add_argument(
        "--compile-at-start",
        action="store_true",
        default=os.environ.get("TANDEM_COMPILE_AT_START", "") not in ("", "0", "false"),
        help="compile every shape bucket serving runs before SERVING, so no request waits for a compile (a minute or "
        "two on a CPU the first time, seconds with a warm compilation cache)",
    )


def pool_flags(slots: int, max_batch: int, max_len: int) -> str:
    """The model services' flags that size what `--compile-at-start` compiles, with their values (for its errors)."""
    return f"--slots ({slots}), --max-batch ({max_batch}) or --max-len ({max_len})"


def batching_from_args(parser: Any, args: Any) -> BatchingConfig:
    """A BatchingConfig from the flags of `add_batching_flags` (a parser error for bad values)."""
    if args.max_batch < 1 or args.batch_window_ms < 0:
        parser.error("--max-batch must be >= 1 and --batch-window-ms >= 0")
    return BatchingConfig(max_batch=args.max_batch, window_s=args.batch_window_ms / 1000)
