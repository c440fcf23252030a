"""llama.cpp's block cost, as `experiments/block_cost.py` measures ours: ms per decode of k = 1..8 tokens after 256
cached tokens (median of 15 calls per k, the k's interleaved), on the GGUF our primary loads, with as many threads as
this process may use, as one JSON line. Needs llama-cpp-python (docker/build-llamacpp.sh). Compare with ours in
alternating processes: `for r in 1 2; do .venv/bin/python experiments/block_cost.py; .venv/bin/python
experiments/llamacpp_block_cost.py; done` (~1 min each).
"""

from __future__ import annotations

import json
import statistics
import time

import llama_cpp

from benchmark.peer_llamacpp import default_threads
from tandem.decoding.bundle import BundleConfig


def main(context: int = 256, max_k: int = 8, calls: int = 15) -> None:
    threads = default_threads()
    llm = llama_cpp.Llama(
        str(BundleConfig().resolved_gguf()),
        n_ctx=2 * context,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,  # a verify reads every position's logits, as ours returns them
        verbose=False,
    )
    llm.eval([(7 * i) % 1000 + 100 for i in range(context)])
    times: dict[int, list[float]] = {k: [] for k in range(1, max_k + 1)}
    for call in range(calls + 2):  # the first two rounds warm up
        for k in range(1, max_k + 1):
            llm.n_tokens = context  # eval drops the cache past n_tokens first
            start = time.perf_counter()
            llm.eval([(13 * j) % 1000 + 100 for j in range(k)])
            if call >= 2:
                times[k].append((time.perf_counter() - start) * 1e3)
    ms = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(json.dumps({"engine": "llama.cpp", "threads": threads, "context": context, "ms": ms}))


if __name__ == "__main__":
    main()
