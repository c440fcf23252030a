"""The `tandem` command line. This file is intentionally kept thin: it parses flags and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tandem.config import DEFAULT_MODE, MODES, SamplingParams, SpecConfig


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion with the bundled models")
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompts)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='one JSON object per line with a "prompt" key')
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k truncation")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--gamma-max", type=int, default=SpecConfig.gamma_max, help="most tokens drafted per round")
    p.add_argument("--tau", type=float, default=SpecConfig.tau, help="keep drafting while confidence >= tau")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--in-process", action="store_true", help="run the models in this process (the only path so far)")
    p.add_argument("--max-len", type=int, default=2048, help="context slots per sequence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem Transformers + SPEED serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
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
        spec = SpecConfig(gamma_max=args.gamma_max, tau=args.tau)
    except ValueError as e:
        raise SystemExit(f"tandem generate: {e}") from None
    if args.max_tokens < 1:
        raise SystemExit("tandem generate: --max-tokens must be >= 1")
    prompts = _prompts(args)
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
        if args.json:
            out: dict[str, Any] = {
                "prompt": prompt,
                "text": "".join(pieces),
                "token_ids": token_ids,
                "mode": args.mode,
                "finish_reason": result.finish_reason,
                "stats": result.stats.to_dict(),
            }
            print(json.dumps(out, ensure_ascii=False), flush=True)
        else:
            print(tail, flush=True)
            print(f"[{args.mode}] {_summary(result.stats)} finish={result.finish_reason}", file=sys.stderr, flush=True)
    return 0


def _summary(s: Any) -> str:
    return (
        f"{s.output_tokens} tokens in {s.elapsed_s:.2f}s ({s.tokens_per_s:.1f} tok/s), rounds={s.rounds}, "
        f"accepted {s.accepted_tokens}/{s.drafted_tokens} drafts"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
