"""Builds and runs the Primary service. `python -m primary_svc --help` lists the flags (each also an env var)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from primary_svc.servicer import PrimaryServicer
from tandem.config import BatchingConfig
from tandem.decoding.warmup import (
    RUN_UPTO_TOKENS,
    compile_all,
    compiled_programs,
    enable_compilation_cache,
    memory_maps,
    warm_prefix,
)
from tandem.decoding.workers import PrimaryWorker
from tandem.errors import WarmupError
from tandem.model.kvcache import MIN_ATTEND, buckets, rows_per_call
from tandem.model.primary import PrimaryRunner
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

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Primary"].full_name


@dataclasses.dataclass(frozen=True)
class PrimaryServiceConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    metrics_port: int | None = None  # Prometheus endpoint; None = off, 0 = a free port
    slots: int = 8  # concurrent sessions (KV cache slots)
    max_len: int = 2048  # positions per session
    session_ttl_s: float = 120.0  # idle sessions are released after this long
    gguf_path: Path | None = None  # None: the bundled SmolLM2
    tls: TlsFiles | None = None  # TLS / mutual TLS (tandemrpc.security); None = plaintext
    batching: BatchingConfig = BatchingConfig()  # sessions per batched model call and the batching window
    compile_at_start: bool = False  # compile every decode/verify and prefill bucket before reporting SERVING
    prefix_rows: int = (
        4  # prompts whose first positions later prompts may reuse (tandem.model.kvcache.PrefixCache); 0 = off
    )
    int8_activations: bool = True  # Q4_1 layer and Q8_0 head products on 8-bit inputs on the CPU kernel (BundleConfig)


def build_server(worker: PrimaryWorker, cfg: PrimaryServiceConfig) -> ServiceServer:
    """The Primary service around a worker (tests pass a tiny one)."""
    registry = CollectorRegistry()
    used = Gauge("tandem_primary_slots_used", "KV cache slots held by live sessions", registry=registry)
    used.set_function(lambda: len(worker.pool))
    total = Gauge("tandem_primary_slots_total", "KV cache slots", registry=registry)
    total.set(worker.pool.capacity)
    queued = Gauge("tandem_primary_queue_depth", "calls waiting for the model", registry=registry)
    queued.set_function(lambda: worker.waiting)
    batches = Gauge("tandem_primary_batches", "batched model calls so far (monotonic)", registry=registry)
    batches.set_function(lambda: worker.batcher.batches)
    calls = Gauge("tandem_primary_batched_calls", "session calls those batches served (monotonic)", registry=registry)
    calls.set_function(lambda: worker.batcher.calls)
    add_process_gauges(registry, "primary", memory_maps, compiled_programs)
    busy = Gauge("tandem_primary_busy_seconds", "seconds spent running model calls (monotonic)", registry=registry)
    busy.set_function(lambda: worker.busy_s)
    prefixes = worker.prefixes
    if prefixes is not None:
        hits = Gauge(
            "tandem_primary_prefix_hits", "prefills that reused a cached prefix (monotonic)", registry=registry
        )
        hits.set_function(lambda: prefixes.hits)
        reused = Gauge(
            "tandem_primary_prefix_reused_positions",
            "prompt positions taken from the prefix cache (monotonic)",
            registry=registry,
        )
        reused.set_function(lambda: prefixes.reused)
    return ServiceServer(
        lambda server: pb_grpc.add_PrimaryServicer_to_server(PrimaryServicer(worker), server),
        [SERVICE_NAME],
        host=cfg.host,
        port=cfg.port,
        metrics_port=cfg.metrics_port,
        registry=registry,
        tls=cfg.tls,
        housekeeping=[(min(5.0, cfg.session_ttl_s / 2), lambda: worker.expire_idle(cfg.session_ttl_s))],
        max_workers=worker.pool.capacity + 16,  # one call in flight per session, plus releases and health checks
    )


def serving_shapes(runner: PrimaryRunner, max_batch: int, max_block: int = 8) -> list[tuple[int, int, int]]:
    """What serving runs, smallest first: verify blocks (1..max_block tokens) of every batch bucket up to the slots and
    max_batch against every cache bucket, and prefills of every length bucket at every batch bucket a call of that
    length takes (prompts that arrive together are prefilled together, `rows_per_call` at a time)."""
    batches = buckets(min(runner.batch, max_batch))
    shapes = runner.shapes(batches, buckets(max_block), runner.cache.attend_buckets())
    for t in buckets(runner.max_len, cap=runner.max_len):
        shapes |= runner.shapes([b for b in batches if b <= rows_per_call(t)], [t], [MIN_ATTEND])
    return sorted(shapes, key=lambda s: (s[0] * s[1], s))


def parse_args(argv: Sequence[str] | None = None) -> PrimaryServiceConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m primary_svc", description="Tandem primary service (block verify)")
    p.add_argument("--host", default=env("TANDEM_PRIMARY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("TANDEM_PRIMARY_PORT", "50051")))
    p.add_argument("--metrics-port", type=int, default=int(env("TANDEM_PRIMARY_METRICS_PORT", "9091")))
    p.add_argument("--slots", type=int, default=int(env("TANDEM_PRIMARY_SLOTS", "8")))
    p.add_argument("--max-len", type=int, default=int(env("TANDEM_MAX_LEN", "2048")))
    p.add_argument("--session-ttl-s", type=float, default=float(env("TANDEM_SESSION_TTL_S", "120")))
    p.add_argument("--gguf", type=Path, default=env("TANDEM_GGUF") or None, help="primary GGUF (default: SmolLM2)")
    p.add_argument(
        "--prefix-cache-rows",
        type=int,
        default=int(env("TANDEM_PREFIX_CACHE_ROWS", "4")),
        help="prompts whose first 64 positions later prompts that start the same way reuse (0: off)",
    )
    p.add_argument(
        "--activations",
        choices=("int8", "float32"),
        default=env("TANDEM_ACTIVATIONS", "int8"),
        help="inputs of the Q4_1 layer and Q8_0 head products on the CPU kernel: int8 (per 32-input block, as "
        "llama.cpp) or float32",
    )
    add_batching_flags(p, "TANDEM_PRIMARY")
    add_compile_flag(p)
    add_tls_flags(p)
    a = p.parse_args(argv)
    tls = tls_from_args(p, a)
    batching = batching_from_args(p, a)
    if a.prefix_cache_rows < 0:
        p.error("--prefix-cache-rows must be >= 0")
    return PrimaryServiceConfig(
        a.host,
        a.port,
        a.metrics_port,
        a.slots,
        a.max_len,
        a.session_ttl_s,
        a.gguf,
        tls,
        batching,
        a.compile_at_start,
        a.prefix_cache_rows,
        a.activations == "int8",
    )


def main(argv: Sequence[str] | None = None) -> None:
    die_with_parent()  # started by ServeStack: stop when it dies
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    from tandem.decoding.bundle import BundleConfig, load_primary  # loads JAX

    bundle = BundleConfig(
        gguf_path=cfg.gguf_path, max_len=cfg.max_len, slots=cfg.slots, int8_activations=cfg.int8_activations
    )
    runner, tokenizer = load_primary(bundle)
    log = logging.getLogger("primary_svc")
    log.info("XLA compilation cache: %s", enable_compilation_cache())
    if cfg.compile_at_start:
        try:
            compile_all(
                serving_shapes(runner, cfg.batching.max_batch),
                lambda shape: runner.compile([shape], run_upto=RUN_UPTO_TOKENS),
                what="primary",
                smaller=pool_flags(cfg.slots, cfg.batching.max_batch, cfg.max_len),
            )
        except WarmupError as e:
            raise SystemExit(f"primary_svc: {e}") from None
    worker = PrimaryWorker(runner, cfg.batching, cfg.prefix_rows)
    if cfg.compile_at_start:
        log.info("prefix cache: the chat preamble's %d tokens", warm_prefix(worker, tokenizer))
    server = build_server(worker, cfg).start()
    log.info("serving %s on %s (metrics :%s, %d slots)", SERVICE_NAME, server.address, server.metrics_port, cfg.slots)
    server.serve_until_signalled()
