"""Prefill time with and without the Primary's prefix cache, on the bench prompts as chat, and whether the greedy
tokens after it are the same. Usage: `.venv/bin/python experiments/prefix_prefill.py [PROMPTS.jsonl]` (~1 min)."""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmark.prompts import read_prompts, tokenize_prompts
from tandem.config import SamplingParams
from tandem.decoding.bundle import BundleConfig, load_primary
from tandem.decoding.workers import PrimaryWorker

GREEDY = SamplingParams()


def main(path: str = "prompts/bench.jsonl", passes: int = 3, tokens: int = 64) -> None:
    runner, tok = load_primary(BundleConfig(slots=2, max_len=256))
    workers = {rows: PrimaryWorker(runner, prefix_rows=rows) for rows in (4, 0)}
    prompts = [list(p.ids) for p in tokenize_prompts(read_prompts(path), tok)]
    ms: dict[int, list[float]] = {rows: [] for rows in workers}
    outputs: dict[int, list[list[int]]] = {rows: [] for rows in workers}
    for p in range(passes):  # the first pass compiles and fills the cache; it is not timed
        for ids in prompts:
            for rows, w in workers.items():  # interleaved, so drift hits both alike
                start = time.perf_counter()
                out = [w.prefill("s", ids, GREEDY, False).next_token]
                if p:
                    ms[rows].append(1000 * (time.perf_counter() - start))
                if p == passes - 1:
                    while len(out) < tokens:
                        out.append(w.verify("s", [out[-1]], [], True, False).next_token)
                    outputs[rows].append(out)
                w.release("s")
    cache = workers[4].prefixes
    assert cache is not None
    same = sum(a == b for a, b in zip(outputs[4], outputs[0], strict=True))
    print(f"prompts: {len(prompts)}, median {np.median([len(p) for p in prompts]):.1f} tokens")
    print(f"reused per hit: {cache.reused / max(cache.hits, 1):.1f} positions ({cache.hits} hits)")
    for rows in workers:
        print(f"prefix rows {rows}: prefill median {np.median(ms[rows]):.1f} ms, mean {np.mean(ms[rows]):.1f} ms")
    print(f"greedy {tokens} tokens identical with and without: {same} of {len(prompts)}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
