"""A benchmark run: every (mode, via) on every prompt, interleaved, then the micro-benchmarks; `run_with_bundle` is
what `tandem bench` calls (the shipped models in process, and a stack of services started here unless given one).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from benchmark.backends import Backend, GrpcBackend, InProcessBackend, Peer, PeerBackend, load_peer
from benchmark.config import BenchConfig, peer_of, split_mode
from benchmark.machine import machine_info
from benchmark.metrics import orchestrator_counters
from benchmark.micro import call_costs
from benchmark.prompts import BenchPrompt, tokenize_prompts
from benchmark.report import build_report, jsonable, log_stderr
from benchmark.stack import launch_stack, wait_serving
from benchmark.stats import Sample

if TYPE_CHECKING:
    from tandem.decoding.engine import Engine


def run(
    cfg: BenchConfig,
    prompts: Sequence[BenchPrompt],
    *,
    engine: Engine | None = None,
    target: str | None = None,
    peers: Mapping[str, Peer] | None = None,
    args: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    metrics_url: str | None = None,
    service_metrics: Sequence[str] = (),
    log: Callable[[str], None] = log_stderr,
) -> dict[str, Any]:
    """Runs the benchmark and returns its report (see `build_report`).

    Args:
        cfg: what to measure.
        prompts: the prompt set (token ids are sent as they are).
        engine: the in-process engine (needed for via in-process and for the block-cost curve).
        target: the orchestrator's HOST:PORT (needed for via grpc).
        peers: the peer implementations of cfg.peers, by name.
        args: the command line's arguments, recorded in the report (default: the config).
        extra: more top-level report entries (e.g. where the drafters came from).
        metrics_url: the orchestrator's Prometheus endpoint; its fallback counters are recorded if given.
        service_metrics: the model services' Prometheus endpoints, for each gRPC request's model time (overhead).
        log: progress lines.

    Raises:
        ValueError: a backend the config needs was not given, or the prompt set is empty.
    """
    if not prompts:
        raise ValueError("no prompts")
    if "in-process" in cfg.vias and engine is None:
        raise ValueError("via in-process needs an engine")
    if "grpc" in cfg.vias and target is None:
        raise ValueError("via grpc needs a target")
    peers = dict(peers or {})
    missing = [name for name in cfg.peers if name not in peers]
    if missing:
        raise ValueError(f"cfg.peers={cfg.peers!r} needs peers {', '.join(missing)}")
    backends: dict[tuple[str, str], Backend] = {}
    grpc_backend = (
        GrpcBackend(target, service_metrics=service_metrics) if "grpc" in cfg.vias and target is not None else None
    )
    try:
        for mode in cfg.all_modes:
            for via in cfg.vias_of(mode):
                if (name := peer_of(mode)) is not None:
                    backends[via, mode] = PeerBackend(peers[name], name)
                elif via == "grpc":
                    assert grpc_backend is not None
                    backends[via, mode] = grpc_backend
                else:
                    assert engine is not None
                    backends[via, mode] = InProcessBackend(engine)
        counters_before = orchestrator_counters(metrics_url) if metrics_url else None

        warm_tokens = cfg.max_tokens if cfg.warmup_tokens is None else cfg.warmup_tokens
        if warm_tokens:
            longest = max(prompts, key=lambda p: len(p.ids))
            for name in cfg.peers:
                peers[name].warmup()
            for (via, mode), backend in backends.items():
                t0 = time.perf_counter()
                backend.generate(longest.ids, split_mode(mode)[0], warm_tokens, cfg.spec_of(mode))
                log(f"warm-up {mode} ({via}): {time.perf_counter() - t0:.2f}s")

        samples: dict[tuple[str, str], list[list[Sample]]] = {key: [[] for _ in prompts] for key in backends}
        total = cfg.repeats * len(prompts) * len(backends)
        n = 0
        for r in range(cfg.repeats):
            for i, prompt in enumerate(prompts):
                # Interleaved: each mode in turn on this prompt, in reverse order every other time (A B B A ...), so
                # that drift on a shared machine hits every mode alike.
                turns = list(backends.items())
                for (via, mode), backend in turns if (r * len(prompts) + i) % 2 == 0 else turns[::-1]:
                    s = backend.generate(prompt.ids, split_mode(mode)[0], cfg.max_tokens, cfg.spec_of(mode))
                    samples[via, mode][i].append(s)
                    n += 1
                    rep = f" repeat {r + 1}" if cfg.repeats > 1 else ""
                    log(
                        f"[{n}/{total}] prompt {i + 1}{rep} {mode} ({via}): {s.output_tokens} tokens in "
                        f"{s.e2el_s:.2f}s, {s.tokens_per_s:.1f} tok/s"
                    )
        counters = None
        if metrics_url and counters_before is not None:
            after = orchestrator_counters(metrics_url)
            counters = {k: v - counters_before.get(k, 0.0) for k, v in after.items()}
    finally:
        if grpc_backend is not None:
            grpc_backend.close()

    block_ms: dict[int, float] | None = None
    block_ms_xla: dict[int, float] | None = None
    drafter_ms: dict[str, float] | None = None
    if engine is not None and cfg.block_cost_context is not None:
        block_ms, block_ms_xla, drafter_ms = call_costs(engine, cfg, log)

    return build_report(
        cfg,
        prompts,
        samples,
        block_ms=block_ms,
        block_ms_xla=block_ms_xla,
        drafter_ms=drafter_ms,
        machine=machine_info(),
        args=dict(args) if args is not None else jsonable(dataclasses.asdict(cfg)),
        peer_info={name: peers[name].describe() for name in cfg.peers} or None,
        server_counters=counters,
        extra=extra,
    )


def run_with_bundle(
    cfg: BenchConfig,
    rows: Sequence[tuple[str, str]],
    *,
    target: str | None = None,
    metrics_url: str | None = None,
    service_metrics: Sequence[str] = (),
    max_len: int = 2048,
    startup_timeout_s: float = 600.0,
    args: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = log_stderr,
) -> dict[str, Any]:
    """`tandem bench`: the bundled models in process, and (via grpc) `target` or a ServeStack started here (slots=1).

    The stack is launched before JAX is loaded here (no fork of a JAX process) and loads while the bundle does.
    `metrics_url` (the orchestrator's) and `service_metrics` (the model services') describe a given `target`; a stack
    started here brings its own.
    """
    stack = None
    if "grpc" in cfg.vias and target is None:
        stack = launch_stack(
            slots=1,
            max_len=max_len,
            startup_timeout_s=startup_timeout_s,
            prefix_cache_rows=cfg.prefix_cache_rows,
            log=log,
        )
    try:
        from tandem.decoding.bundle import BundleConfig, load_bundle

        bundle_cfg = BundleConfig(max_len=max_len, prefix_rows=cfg.prefix_cache_rows)
        bundle = load_bundle(bundle_cfg)
        log(f"loaded the bundle in process: {bundle.drafter_sources}")
        peers = {name: load_peer(name, bundle_cfg) for name in cfg.peers}
        if stack is not None:
            target = wait_serving(stack, log)
        prompts = tokenize_prompts(rows, bundle.tokenizer)
        return run(
            cfg,
            prompts,
            engine=bundle.engine,
            target=target,
            peers=peers,
            args=args,
            extra={
                "bundle": {
                    "drafters": bundle.drafter_sources,
                    "max_len": max_len,
                    "grpc_target": target,
                    "grpc_server": None if target is None else "ServeStack(slots=1) started here" if stack else "given",
                }
            },
            metrics_url=stack.metrics_urls["orchestrator"] if stack is not None else metrics_url,
            service_metrics=[stack.metrics_urls[k] for k in ("primary", "secondary")] if stack else service_metrics,
            log=log,
        )
    finally:
        if stack is not None:
            stack.stop()
