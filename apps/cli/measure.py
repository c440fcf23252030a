"""The measurements: `tandem bench` (`benchmark`), `tandem bench-report` and `tandem loadtest` (`loadtest`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apps.cli.common import positive_int, split_csv
from tandem.config import DEFAULT_MODE, MODES, SpecConfig


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="every mode on the same prompts, in process and through gRPC, interleaved, in one run"
    )
    p.add_argument("--prompts", metavar="FILE.jsonl", required=True, help='{"prompt": ..., "category": ...} per line')
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per prompt (default: 128)")
    p.add_argument("--json", metavar="OUT", type=Path, required=True, help="write the report here")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated, must include primary; MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED[:LOOKUP_NGRAM]] runs a "
        "mode with its own settings (e.g. tandem-speed@0:0.8:7, or tandem-speed@0:0.8:4:0:3 for prompt lookup from "
        f"3-grams), so settings compare like modes (default: {','.join(MODES)})",
    )
    p.add_argument(
        "--via", choices=("in-process", "grpc", "both"), default="both", help="where the modes run (default: both)"
    )
    p.add_argument(
        "--peer",
        default=None,
        metavar="PEER[,PEER]",
        help="also run peer implementations in process, comma-separated: hf (Hugging Face transformers: modes hf, "
        "hf-assisted; the peer extra), llamacpp (llama.cpp: modes llamacpp, llamacpp-lookup; built by "
        "docker/build-llamacpp.sh)",
    )
    p.add_argument("--target", default=None, help="orchestrator HOST:PORT for --via grpc (default: start one here)")
    p.add_argument(
        "--metrics-url", default=None, metavar="URL", help="with --target: the orchestrator's metrics (fallback counts)"
    )
    p.add_argument(
        "--service-metrics",
        default=None,
        metavar="URL,URL",
        help="with --target: the model services' metrics endpoints, for the gRPC orchestration overhead",
    )
    p.add_argument("--gamma-max", type=int, default=SpecConfig.gamma_max, help=f"(default: {SpecConfig.gamma_max})")
    p.add_argument("--tau", type=float, default=SpecConfig.tau, help=f"(default: {SpecConfig.tau})")
    p.add_argument("--tau-first", type=float, default=SpecConfig.tau_first, help=f"(default: {SpecConfig.tau_first})")
    p.add_argument(
        "--min-accepted", type=float, default=SpecConfig.min_accepted, help=f"(default: {SpecConfig.min_accepted})"
    )
    p.add_argument(
        "--lookup-ngram",
        type=int,
        default=SpecConfig.lookup_ngram,
        help=f"prompt lookup's shortest matching n-gram, 0 = off (default: {SpecConfig.lookup_ngram})",
    )
    p.add_argument("--repeats", type=int, default=1, help="passes over the prompts; times are per-prompt medians")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")
    p.add_argument("--markdown", metavar="OUT.md", type=Path, default=None, help="also write the tables here")
    p.add_argument("--plot", metavar="OUT.png", type=Path, default=None, help="also draw tokens/s and block cost")
    p.add_argument(
        "--block-cost-context", type=int, default=256, metavar="C", help="cached tokens before the block-cost calls"
    )
    p.add_argument("--no-block-cost", action="store_true", help="skip the block-cost curve and drafter step")
    p.add_argument(
        "--warmup-tokens", type=int, default=None, metavar="N", help="tokens per warm-up run (default: --max-tokens)"
    )
    p.add_argument("--max-len", type=int, default=2048, help="context slots per sequence (default: 2048)")
    p.add_argument(
        "--prefix-cache-rows",
        type=int,
        default=0,
        metavar="N",
        help="the primary's prefix cache in process and in services started here (default: 0, off, so modes that "
        "follow one another on a prompt all prefill it cold)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, metavar="S", help="for the services started here")


def _add_bench_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-report", help="render a `tandem bench` JSON report as markdown (and a plot)")
    p.add_argument("report", metavar="IN.json", type=Path)
    p.add_argument("--markdown", metavar="OUT.md", type=Path, default=None, help="write here instead of stdout")
    p.add_argument("--plot", metavar="OUT.png", type=Path, default=None)


def _add_loadtest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest", help="load the orchestrator with virtual users on Ray: TTFT, TPOT, ITL, throughput, goodput"
    )
    p.add_argument("--target", default=None, help="orchestrator HOST:PORT (default: start the services here)")
    p.add_argument(
        "--prompts", metavar="FILE.jsonl", required=True, help='{"prompt": ...} per line, sent as chat, cycled'
    )
    p.add_argument("--num-requests", type=int, default=100, help="requests per run (default: 100)")
    p.add_argument("--rate", type=float, default=0.0, help="mean requests/s, gamma arrivals; 0 = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps: 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--mode", default=DEFAULT_MODE, help=f"a mode or a comma list of them (default: {DEFAULT_MODE})")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    p.add_argument("--json", metavar="OUT", type=Path, required=True, help="write the report here")
    p.add_argument("--plot", metavar="OUT.png", type=Path, default=None, help="latency CDFs, or the sweep's curves")
    p.add_argument("--markdown", metavar="OUT.md", type=Path, default=None, help="the tables (default: stdout only)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: a local Ray instance)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput counts requests within this TTFT")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput counts requests within this TPOT")
    p.add_argument("--sweep", default=None, metavar="C1,C2,...", help="run the load at each max concurrency")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of every mode at each concurrency, alternating order (default: 1)"
    )
    p.add_argument("--metrics-url", default=None, help="the orchestrator's /metrics, for speculation counters")
    p.add_argument(
        "--service-metrics",
        default=None,
        metavar="URL,URL",
        help="with --target: the model services' metrics endpoints; a run during which they compiled is flagged",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the arrival gaps (default: 0)")
    p.add_argument("--users", type=int, default=2, help="virtual users: Ray actors, one gRPC channel each (default: 2)")
    p.add_argument(
        "--warmup", type=int, default=None, help="unmeasured requests per mode first (default: the max concurrency)"
    )
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="deadline per request (default: 600)")
    p.add_argument("--slots", type=int, default=16, help="sessions per model service started here (default: 16)")
    p.add_argument("--max-len", type=int, default=2048, help="positions per session started here (default: 2048)")
    p.add_argument("--startup-timeout", type=float, default=600.0, metavar="S", help="for the services started here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def bench(args: argparse.Namespace) -> int:
    from benchmark.config import VIA_CHOICES, BenchConfig
    from benchmark.prompts import read_prompts
    from benchmark.report import identity_warnings, write_outputs
    from benchmark.run import run_with_bundle

    try:
        cfg = BenchConfig(
            modes=split_csv(args.modes),
            vias=VIA_CHOICES[args.via],
            max_tokens=args.max_tokens,
            gamma_max=args.gamma_max,
            tau=args.tau,
            tau_first=args.tau_first,
            min_accepted=args.min_accepted,
            lookup_ngram=args.lookup_ngram,
            repeats=args.repeats,
            warmup_tokens=args.warmup_tokens,
            block_cost_context=None if args.no_block_cost else args.block_cost_context,
            peers=split_csv(args.peer or ""),
            prefix_cache_rows=args.prefix_cache_rows,
        )
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be >= 1")
        rows = read_prompts(args.prompts, args.limit)
    except (ValueError, OSError) as e:
        raise SystemExit(f"tandem bench: {e}") from None
    if args.target is not None and "grpc" not in cfg.vias:
        raise SystemExit("tandem bench: --target needs --via grpc or both")
    if args.target is None and (args.metrics_url or args.service_metrics):
        raise SystemExit("tandem bench: --metrics-url and --service-metrics describe a --target")
    import grpc

    from tandem.errors import InvalidRequestError
    from tandemrpc.launch import ServeError

    try:
        report = run_with_bundle(
            cfg,
            rows,
            target=args.target,
            metrics_url=args.metrics_url,
            service_metrics=split_csv(args.service_metrics) if args.service_metrics else (),
            max_len=args.max_len,
            startup_timeout_s=args.startup_timeout,
            args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        )
    except KeyboardInterrupt:
        print("tandem bench: interrupted", file=sys.stderr)
        return 130
    except grpc.RpcError as e:  # a failed call is also a grpc.Call: it has the status code and details
        raise SystemExit(f"tandem bench: {e.code().name}: {e.details()}") from None
    except (InvalidRequestError, ServeError) as e:
        raise SystemExit(f"tandem bench: {e}") from None
    print(write_outputs(report, json_path=args.json, markdown_path=args.markdown, plot_path=args.plot), end="")
    for line in identity_warnings(report):
        print(("!" * 8 + " " if line.startswith("WARNING") else "") + line, file=sys.stderr, flush=True)
    return 0


def bench_report(args: argparse.Namespace) -> int:
    from benchmark.report import write_outputs

    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"tandem bench-report: {args.report}: {e}") from None
    text = write_outputs(report, markdown_path=args.markdown, plot_path=args.plot)
    if args.markdown is None:
        print(text, end="")
    return 0


def loadtest(args: argparse.Namespace) -> int:
    from benchmark.prompts import read_prompts
    from loadtest import LoadTestConfig, chat_prompts, run_loadtest, write_outputs

    try:
        cfg = LoadTestConfig(
            num_requests=args.num_requests,
            rate=args.rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            modes=split_csv(args.mode),
            max_tokens=args.max_tokens,
            sweep=tuple(positive_int(c, "--sweep") for c in split_csv(args.sweep or "")),
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            seed=args.seed,
            users=args.users,
            warmup_requests=args.warmup,
            timeout_s=args.timeout,
            repeats=args.repeats,
        )
        prompts = chat_prompts(read_prompts(args.prompts))
    except (ValueError, OSError) as e:
        raise SystemExit(f"tandem loadtest: {e}") from None
    from tandemrpc.launch import ServeError

    try:
        report = run_loadtest(
            cfg,
            prompts,
            target=args.target,
            metrics_url=args.metrics_url,
            service_metrics=split_csv(args.service_metrics) if args.service_metrics else (),
            ray_address=args.ray_address,
            slots=args.slots,
            max_len=args.max_len,
            startup_timeout_s=args.startup_timeout,
            args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("tandem loadtest: interrupted", file=sys.stderr)
        return 130
    except (ServeError, ValueError) as e:
        raise SystemExit(f"tandem loadtest: {e}") from None
    print(write_outputs(report, json_path=args.json, markdown_path=args.markdown, plot_path=args.plot), end="")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers this module's commands on the `tandem` parser."""
    _add_bench(sub)
    _add_bench_report(sub)
    _add_loadtest(sub)


COMMANDS = {"bench": bench, "bench-report": bench_report, "loadtest": loadtest}
