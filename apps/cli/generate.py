"""`tandem generate`: a completion through a running orchestrator, or with the models in this process."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from apps.cli.common import DEFAULT_TARGET, summary
from tandem.config import DEFAULT_MODE, MODES, SamplingParams, SpecConfig


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
    p.add_argument(
        "--lookup-ngram",
        type=int,
        default=None,
        help="prompt lookup: a round drafts the tokens that followed the newest earlier occurrence of the context's "
        f"last N or more tokens, without the drafter model; 0 = off (default: {SpecConfig.lookup_ngram})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"orchestrator HOST:PORT (default: {DEFAULT_TARGET})")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline per request (default: none)")
    p.add_argument("--in-process", action="store_true", help="run the models in this process instead of --target")
    p.add_argument("--max-len", type=int, default=2048, help="context slots per sequence (--in-process only)")


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
                ("lookup_ngram", args.lookup_ngram),
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
        lookup_ngram=args.lookup_ngram,
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
                    f"[{args.mode}] {summary(result.stats)} finish={result.finish_reason}", file=sys.stderr, flush=True
                )
    return 0


def _generate_in_process(
    args: argparse.Namespace, prompts: list[str], sampling: SamplingParams, spec: SpecConfig
) -> int:
    from tandem.decoding.bundle import BundleConfig, load_bundle  # JAX loads only once the flags are valid

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
            print(f"[{args.mode}] {summary(stats)} finish={result.finish_reason}", file=sys.stderr, flush=True)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers this module's commands on the `tandem` parser."""
    _add_generate(sub)


COMMANDS = {"generate": generate}
