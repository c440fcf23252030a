"""CPU time per generated token of each service process and of the client, for single-stream requests against a
running `tandem serve` (where the per-token cost of the hops goes).

Usage: `.venv/bin/python experiments/cpu_per_token.py STATE.json [MODE] [PROMPTS.jsonl]`, STATE.json being what
`tandem serve --state-file` writes (Linux: reads /proc/PID/stat).
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmark.prompts import read_prompts
from tandemrpc.client import TandemClient

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (stat fields 14 and 15)


def main(state_path: str, mode: str = "primary", prompts_path: str = "prompts/bench.jsonl", n: int = 6) -> None:
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    client = TandemClient(state["orchestrator"])
    chats = [[{"role": "user", "content": text}] for text, _ in read_prompts(prompts_path, n)]
    for chat in chats[:2]:  # warm-up: compiles, caches
        list(client.generate(chat, max_tokens=128, mode=mode))
    pids = state["pids"]
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before, start, tokens = time.process_time(), time.perf_counter(), 0
    for chat in chats:
        for chunk in client.generate(chat, max_tokens=128, mode=mode):
            tokens += len(chunk.token_ids)
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - client_before
    print(f"{mode}: {tokens} tokens in {wall:.2f} s, {tokens / wall:.1f} tokens/s, {1000 * wall / tokens:.2f} ms/token")
    for name, pid in pids.items():
        used = cpu_seconds(pid) - before[name]
        print(f"  {name}: {1000 * used / tokens:.2f} ms CPU per token ({used / wall:.0%} of wall time)")
    print(f"  client: {1000 * client_cpu / tokens:.2f} ms CPU per token")


if __name__ == "__main__":
    main(*sys.argv[1:4])
