"""Interleaved A/B of speculation settings through a running orchestrator, one stream at a time.

    python bench/ab_settings.py --target 127.0.0.1:50050 --prompts bench/prompts.jsonl --passes 2 --max-tokens 128 \
        --arm primary --arm tandem-speed:0.4:0.8:7 --arm tandem-speed:0.5:0.5:3

Each arm is MODE[:TAU_FIRST:TAU:GAMMA_MAX]. Every prompt runs every arm back to back, the order of the arms reversed
on every other prompt and pass, so that drift on a shared machine hits all arms alike (`tandem bench` compares modes
at one setting; this compares settings). Prints per arm: output tokens over summed end-to-end time, the median of
per-request tokens/s, and whether every output equals the first arm's token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tandemrpc.client import TandemClient


def parse_arm(text: str) -> tuple[str, float | None, float | None, int]:
    mode, *rest = text.split(":")
    if rest and len(rest) != 3:
        raise SystemExit(f"--arm {text!r}: expected MODE or MODE:TAU_FIRST:TAU:GAMMA_MAX")
    return (mode, float(rest[0]), float(rest[1]), int(rest[2])) if rest else (mode, None, None, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="127.0.0.1:50050")
    p.add_argument("--prompts", required=True)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--arm", action="append", required=True, help="MODE[:TAU_FIRST:TAU:GAMMA_MAX]; first: the base")
    args = p.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    times: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(arms))}
    outputs: dict[int, dict[int, list[int]]] = {i: {} for i in range(len(arms))}
    with TandemClient(args.target, timeout_s=600) as client:

        def run(arm: int, prompt: str, max_tokens: int) -> tuple[list[int], float]:
            mode, tau_first, tau, gamma_max = arms[arm]
            start, ids = time.perf_counter(), []
            chat = [{"role": "user", "content": prompt}]
            kw = dict(mode=mode, max_tokens=max_tokens, tau_first=tau_first, tau=tau, gamma_max=gamma_max)
            for chunk in client.generate(chat, **kw):
                ids += list(chunk.token_ids)
            return ids, time.perf_counter() - start

        for prompt in prompts[:2]:  # warm-up
            for arm in range(len(arms)):
                run(arm, prompt, 16)
        for r in range(args.passes):
            for i, prompt in enumerate(prompts):
                order = range(len(arms)) if (r + i) % 2 == 0 else reversed(range(len(arms)))
                for arm in order:
                    ids, seconds = run(arm, prompt, args.max_tokens)
                    times[arm].append((len(ids), seconds))
                    outputs[arm][i] = ids
    base = sum(n for n, _ in times[0]) / sum(s for _, s in times[0])
    for arm, text in enumerate(args.arm):
        tok_s = sum(n for n, _ in times[arm]) / sum(s for _, s in times[arm])
        med = statistics.median(n / s for n, s in times[arm])
        same = all(outputs[arm][i] == outputs[0][i] for i in outputs[arm])
        print(f"{text}: {tok_s:.2f} tok/s ({tok_s / base:.3f}x), median per request {med:.2f}, identical {same}")


if __name__ == "__main__":
    main()
