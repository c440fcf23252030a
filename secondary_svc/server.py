"""Builds and runs the Secondary service (the drafters). `python -m secondary_svc --help` lists the flags (each also
an env var)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from secondary_svc.servicer import SecondaryServicer
from tandem.config import BatchingConfig
from tandem.decoding.warmup import (
    RUN_UPTO_TOKENS,
    compile_all,
    compiled_programs,
    enable_compilation_cache,
    memory_maps,
)
from tandem.decoding.workers import DrafterWorker
from tandem.errors import WarmupError
from tandemrpc.process import die_with_parent
from tandemrpc.security import TlsFiles, add_tls_flags, tls_from_args
from tandemrpc.server import (
    ServiceServer,
    add_batching_flags,
    add_compile_flag,
    add_process_gauges,
    batching_from_args,
    pool_flags,
)
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Secondary"].full_name


@dataclasses.dataclass(frozen=True)
class SecondaryServiceConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    metrics_port: int | None = None  # Prometheus endpoint; None = off, 0 = a free port
    slots: int = 8  # concurrent sessions per drafter
    max_len: int = 2048
    session_ttl_s: float = 120.0
    gguf_path: Path | None = None  # the primary whose shape the drafters follow (None: the bundled SmolLM2)
    tls: TlsFiles | None = None  # TLS / mutual TLS (tandemrpc.security); None = plaintext
    batching: BatchingConfig = BatchingConfig()  # sessions per batched model call and the batching window
    compile_at_start: bool = False  # compile the Tandem drafter's greedy rounds and ingests before reporting SERVING


def build_server(workers: dict[str, DrafterWorker], cfg: SecondaryServiceConfig) -> ServiceServer:
    """The Secondary service around drafter workers keyed "tandem" / "vanilla" (tests pass tiny ones)."""
    registry = CollectorRegistry()
    add_process_gauges(registry, "secondary", memory_maps, compiled_programs)
    used = Gauge("tandem_secondary_slots_used", "drafter cache slots held", ["drafter"], registry=registry)
    total = Gauge("tandem_secondary_slots_total", "drafter cache slots", ["drafter"], registry=registry)
    queued = Gauge("tandem_secondary_queue_depth", "calls waiting for a drafter", ["drafter"], registry=registry)
    busy = Gauge(
        "tandem_secondary_busy_seconds",
        "seconds spent running drafter calls (monotonic)",
        ["drafter"],
        registry=registry,
    )
    for name, w in workers.items():
        used.labels(drafter=name).set_function(w.pool.__len__)
        total.labels(drafter=name).set(w.pool.capacity)
        queued.labels(drafter=name).set_function(functools.partial(getattr, w, "waiting"))
        busy.labels(drafter=name).set_function(functools.partial(getattr, w, "busy_s"))

    def expire() -> None:
        for w in workers.values():
            w.expire_idle(cfg.session_ttl_s)

    return ServiceServer(
        lambda server: pb_grpc.add_SecondaryServicer_to_server(SecondaryServicer(workers), server),
        [SERVICE_NAME],
        host=cfg.host,
        port=cfg.port,
        metrics_port=cfg.metrics_port,
        registry=registry,
        tls=cfg.tls,
        housekeeping=[(min(5.0, cfg.session_ttl_s / 2), expire)],
        max_workers=sum(w.pool.capacity for w in workers.values()) + 16,  # each session's Draft stream holds a thread
    )


def parse_args(argv: Sequence[str] | None = None) -> SecondaryServiceConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m secondary_svc", description="Tandem drafter service")
    p.add_argument("--host", default=env("TANDEM_SECONDARY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("TANDEM_SECONDARY_PORT", "50052")))
    p.add_argument("--metrics-port", type=int, default=int(env("TANDEM_SECONDARY_METRICS_PORT", "9092")))
    p.add_argument("--slots", type=int, default=int(env("TANDEM_SECONDARY_SLOTS", "8")))
    p.add_argument("--max-len", type=int, default=int(env("TANDEM_MAX_LEN", "2048")))
    p.add_argument("--session-ttl-s", type=float, default=float(env("TANDEM_SESSION_TTL_S", "120")))
    p.add_argument("--gguf", type=Path, default=env("TANDEM_GGUF") or None, help="primary GGUF (default: SmolLM2)")
    add_batching_flags(p, "TANDEM_SECONDARY")
    add_compile_flag(p)
    add_tls_flags(p)
    a = p.parse_args(argv)
    tls = tls_from_args(p, a)
    batching = batching_from_args(p, a)
    return SecondaryServiceConfig(
        a.host, a.port, a.metrics_port, a.slots, a.max_len, a.session_ttl_s, a.gguf, tls, batching, a.compile_at_start
    )


def main(argv: Sequence[str] | None = None) -> None:
    die_with_parent()  # started by ServeStack: stop when it dies
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    from tandem.decoding.bundle import BundleConfig, load_drafters, primary_config  # loads JAX

    bundle = BundleConfig(gguf_path=cfg.gguf_path, max_len=cfg.max_len, slots=cfg.slots)
    runners, routers, sources = load_drafters(primary_config(bundle), bundle)
    workers = {name: DrafterWorker(r, routers[name], cfg.batching) for name, r in runners.items()}
    log = logging.getLogger("secondary_svc")
    log.info("XLA compilation cache: %s", enable_compilation_cache())
    if cfg.compile_at_start:
        # a feature-level drafter's shapes compile on first use, like the vanilla drafter's
        plan = [(w, s) for w in workers.values() if w.tandem and not w.runner.cfg.features for s in w.serving_shapes()]
        try:
            compile_all(
                plan,
                lambda item: item[0].compile_shape(item[1], RUN_UPTO_TOKENS),
                what="secondary",
                smaller=pool_flags(cfg.slots, cfg.batching.max_batch, cfg.max_len),
            )
        except WarmupError as e:
            raise SystemExit(f"secondary_svc: {e}") from None
    server = build_server(workers, cfg).start()
    log.info("serving %s on %s (metrics :%s, drafters %s)", SERVICE_NAME, server.address, server.metrics_port, sources)
    server.serve_until_signalled()
