"""Warm start of the three services: time to SERVING from an empty compilation cache and again from the cache it
filled (a restart), each model service's memory maps and compiled programs once serving, and the TTFT of the first
requests right after SERVING against the steady state, at concurrency 1 and 16.

Usage: `.venv/bin/python experiments/warm_start.py [--slots 16] [--max-len 2048] [--json OUT]` (~10 min on the
2-core VM). The first 16 requests at each concurrency run right after the stack reports SERVING; the steady state is
the same 16 requests twice more. `tandem-speed`, greedy, 32 tokens, the bench prompts as chat, the orchestrator's
payoff off (every request speculates).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service_split import _metric

from tandemrpc.client import TandemClient
from tandemrpc.launch import ServeStack

PROMPTS = [json.loads(line)["prompt"] for line in Path("prompts/bench.jsonl").read_text().splitlines()]


def ttft(client: TandemClient, prompt: str) -> float:
    """Seconds to the first streamed chunk of one request (read to the end)."""
    start, first = time.perf_counter(), None
    for _ in client.generate([{"role": "user", "content": prompt}], mode="tandem-speed", max_tokens=32):
        first = first or time.perf_counter() - start
    assert first is not None
    return first


def batch_ttfts(target: str, concurrency: int, n: int = 16) -> list[float]:
    """TTFTs of n requests, `concurrency` at a time."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with TandemClient(target, timeout_s=600) as client, ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: ttft(client, p), prompts))


def start(args: argparse.Namespace, log_dir: Path) -> tuple[ServeStack, dict[str, float]]:
    ready: dict[str, float] = {}
    # --no-payoff: every request speculates (with the payoff on, a lone request may run primary-only once the primary
    # alone measured faster, and then its first token skips the drafter: the runs would compare different paths).
    stack = ServeStack(
        port=0,
        slots=args.slots,
        max_len=args.max_len,
        log_dir=log_dir,
        startup_timeout_s=1800,
        extra_args={"orchestrator": ["--no-payoff"]},
    )
    stack.start(on_ready=lambda name, s: ready.__setitem__(name, round(s, 1)))
    return stack, ready


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tandem-warm-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(work / "xla")  # empty: a cold start
    out: dict[str, object] = {"slots": args.slots, "max_len": args.max_len}
    stack, out["cold_ready_s"] = start(args, work / "cold")
    try:
        programs: dict[str, float] = {}
        for service in ("primary", "secondary"):
            url = stack.metrics_urls[service]
            out[f"{service}_memory_maps"] = _metric(url, f"tandem_{service}_memory_maps")
            programs[service] = out[f"{service}_compiled_programs"] = _metric(
                url, f"tandem_{service}_compiled_programs"
            )
        for concurrency in (1, 16):
            first = batch_ttfts(stack.orchestrator_address, concurrency)
            steady = [t for _ in range(2) for t in batch_ttfts(stack.orchestrator_address, concurrency)]
            out[f"c{concurrency}"] = {
                "first_p99_s": round(max(first), 3),  # nearest-rank p99 of 16: the largest
                "steady_p99_s": round(max(steady), 3),  # nearest-rank p99 of 32: the largest
                "first_s": [round(x, 3) for x in first],
            }
        out["compiled_while_serving"] = {
            s: _metric(stack.metrics_urls[s], f"tandem_{s}_compiled_programs") - programs[s] for s in programs
        }
    finally:
        stack.stop()
    stack, out["restart_ready_s"] = start(args, work / "restart")
    stack.stop()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
