"""Builds and runs the Orchestrator service. `python -m orchestrator --help` lists the flags (each also an env var)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from orchestrator.config import OrchestratorConfig
from orchestrator.core import Orchestrator
from orchestrator.load import LoadPolicy
from orchestrator.payoff import PayoffConfig
from orchestrator.routing import Targets
from orchestrator.servicer import OrchestratorServicer
from tandem.config import SpecConfig
from tandem.formats.tokenizer import Tokenizer
from tandemrpc.process import die_with_parent
from tandemrpc.security import BearerTokenInterceptor, TlsFiles, add_tls_flags, read_token, tls_from_args
from tandemrpc.server import ServiceServer
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name


@dataclasses.dataclass(frozen=True)
class OrchestratorServiceConfig:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    core: OrchestratorConfig = OrchestratorConfig()
    tls: TlsFiles | None = None  # serve the public API over TLS (mutual TLS with a CA)
    auth_token: str | None = None  # require `authorization: Bearer <token>` on the public API


def build_server(cfg: OrchestratorServiceConfig, tokenizer: Tokenizer | None) -> tuple[ServiceServer, Orchestrator]:
    registry = CollectorRegistry()
    core = Orchestrator(cfg.core, tokenizer, registry)
    server = ServiceServer(
        lambda s: pb_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(core), s),
        [SERVICE_NAME],
        host=cfg.host,
        port=cfg.port,
        metrics_port=cfg.metrics_port,
        registry=registry,
        tls=cfg.tls,
        interceptors=[BearerTokenInterceptor(cfg.auth_token, [SERVICE_NAME])] if cfg.auth_token else [],
        # Every running or queued request holds a handler thread; keep some for health checks and rejections.
        max_workers=cfg.core.max_running + cfg.core.max_queued + 8,
    )
    return server, core


def parse_args(argv: Sequence[str] | None = None) -> tuple[OrchestratorServiceConfig, Path | None]:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m orchestrator", description="Tandem orchestrator (public API)")
    p.add_argument("--host", default=env("TANDEM_ORCHESTRATOR_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("TANDEM_ORCHESTRATOR_PORT", "50050")))
    p.add_argument("--metrics-port", type=int, default=int(env("TANDEM_ORCHESTRATOR_METRICS_PORT", "9090")))
    targets = "HOST:PORT, HOST:PORT,HOST:PORT, or dns:///HOST:PORT (every resolved pod; session-affine)"
    p.add_argument("--primary", default=env("TANDEM_PRIMARY_TARGET", "127.0.0.1:50051"), help=targets)
    p.add_argument("--secondary", default=env("TANDEM_SECONDARY_TARGET", "127.0.0.1:50052"), help=targets)
    p.add_argument(
        "--resolve-interval-s",
        type=float,
        default=float(env("TANDEM_RESOLVE_INTERVAL_S", "5")),
        help="re-resolve dns:/// targets this often",
    )
    p.add_argument("--max-len", type=int, default=int(env("TANDEM_MAX_LEN", "2048")))
    p.add_argument("--max-tokens-limit", type=int, default=int(env("TANDEM_MAX_TOKENS_LIMIT", "1024")))
    p.add_argument(
        "--max-running",
        type=int,
        default=int(env("TANDEM_MAX_RUNNING", "16")),
        help="requests running at once; match the model services' slots",
    )
    p.add_argument(
        "--max-queued",
        type=int,
        default=int(env("TANDEM_MAX_QUEUED", "16")),
        help="requests waiting for a running place; more get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--queue-timeout-s",
        type=float,
        default=float(env("TANDEM_QUEUE_TIMEOUT_S", "10")),
        help="a queued request gives up with RESOURCE_EXHAUSTED after this long",
    )
    p.add_argument(
        "--tpot-target-ms",
        type=float,
        default=float(env("TANDEM_TPOT_TARGET_MS", "0")) or None,
        help="adapt the running limit (up to --max-running) to keep time per output token near this; 0 = off",
    )
    p.add_argument(
        "--load-full-until",
        type=int,
        default=int(env("TANDEM_LOAD_FULL_UNTIL", str(LoadPolicy.full_until))),
        help="running requests per primary replica up to which speculation keeps the request's γ",
    )
    p.add_argument(
        "--load-primary-only-from",
        type=int,
        default=int(env("TANDEM_LOAD_PRIMARY_ONLY_FROM", str(LoadPolicy.primary_only_from))),
        help="running requests per primary replica from which requests run primary-only rounds",
    )
    p.add_argument(
        "--load-multi-step",
        type=int,
        default=int(env("TANDEM_LOAD_MULTI_STEP", str(LoadPolicy.multi_step))),
        help="from --load-primary-only-from on: one-token steps per Primary call of a primary-only request (1 = off)",
    )
    p.add_argument(
        "--min-accepted",
        type=float,
        default=float(env("TANDEM_MIN_ACCEPTED", str(SpecConfig.min_accepted))),
        help="requests' default: pause speculation while their rounds keep fewer drafts on average (0: never)",
    )
    p.add_argument(
        "--lookup-ngram",
        type=int,
        default=int(env("TANDEM_LOOKUP_NGRAM", str(SpecConfig.lookup_ngram))),
        help="requests' default: prompt lookup drafts when the newest this-many tokens occurred earlier (0: off)",
    )
    p.add_argument(
        "--payoff",
        action=argparse.BooleanOptionalAction,
        default=env("TANDEM_PAYOFF", "1") != "0",
        help="alone on a primary replica, run speculative requests primary-only while the primary alone has been the "
        "faster on this server's own requests (env TANDEM_PAYOFF=0: off)",
    )
    p.add_argument(
        "--payoff-explore-every",
        type=int,
        default=int(env("TANDEM_PAYOFF_EXPLORE_EVERY", str(PayoffConfig.explore_every))),
        help="with --payoff: one decision in this many takes the slower path, to keep both rates current",
    )
    p.add_argument("--gguf", type=Path, default=env("TANDEM_GGUF") or None, help="tokenizer source (default: SmolLM2)")
    add_tls_flags(p)
    p.add_argument(
        "--auth-token-file",
        type=Path,
        default=env("TANDEM_AUTH_TOKEN_FILE") or None,
        help="require this bearer token on the public API (or set TANDEM_AUTH_TOKEN)",
    )
    a = p.parse_args(argv)
    tls = tls_from_args(p, a)
    for flag, value in (("--primary", a.primary), ("--secondary", a.secondary)):
        try:
            Targets.parse(value)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    if a.max_running < 1 or a.max_queued < 0 or a.queue_timeout_s < 0 or (a.tpot_target_ms or 0) < 0:
        p.error("--max-running must be >= 1, --max-queued, --queue-timeout-s and --tpot-target-ms >= 0")
    try:
        load = LoadPolicy(a.load_full_until, a.load_primary_only_from, a.load_multi_step)
    except ValueError as e:
        p.error(f"--load-full-until/--load-primary-only-from/--load-multi-step: {e}")
    try:
        payoff = PayoffConfig(enabled=a.payoff, explore_every=a.payoff_explore_every)
    except ValueError as e:
        p.error(f"--payoff-explore-every: {e}")
    try:
        default_spec = SpecConfig(min_accepted=a.min_accepted, lookup_ngram=a.lookup_ngram)
    except ValueError as e:
        p.error(f"--min-accepted/--lookup-ngram: {e}")
    core = OrchestratorConfig(
        primary_target=a.primary,
        secondary_target=a.secondary,
        resolve_interval_s=a.resolve_interval_s,
        max_len=a.max_len,
        max_tokens_limit=a.max_tokens_limit,
        tls=tls,
        max_running=a.max_running,
        max_queued=a.max_queued,
        queue_timeout_s=a.queue_timeout_s,
        tpot_target_ms=a.tpot_target_ms,
        load=load,
        payoff=payoff,
        default_spec=default_spec,
    )
    token = read_token(env("TANDEM_AUTH_TOKEN"), a.auth_token_file)
    return OrchestratorServiceConfig(a.host, a.port, a.metrics_port, core, tls, token), a.gguf


def main(argv: Sequence[str] | None = None) -> None:
    die_with_parent()  # started by ServeStack: stop when it dies
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, gguf_path = parse_args(argv)
    from tandem.formats.assets import smollm2_gguf_path

    tokenizer = Tokenizer.from_gguf(gguf_path or smollm2_gguf_path())
    cfg = dataclasses.replace(cfg, core=dataclasses.replace(cfg.core, vocab_size=tokenizer.vocab_size))
    server, core = build_server(cfg, tokenizer)
    server.start()
    logging.getLogger("orchestrator").info(
        "serving %s on %s (metrics :%s) -> primary %s, secondary %s",
        SERVICE_NAME,
        server.address,
        server.metrics_port,
        cfg.core.primary_target,
        cfg.core.secondary_target,
    )
    try:
        server.serve_until_signalled()
    finally:
        core.close()
