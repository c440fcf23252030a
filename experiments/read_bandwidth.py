"""How fast this machine's cores read memory: the ceiling for a batch-1 step, whose products stream every weight once.

Reads a buffer of each size over and over from THREADS threads at once (numpy releases the GIL; each thread reduces
its own share), and prints the median and best pass as GB/s. Sizes: the primary's layer weights as the kernels hold
them, the head's, both together, and one far larger than the last-level cache.
Usage: `.venv/bin/python experiments/read_bandwidth.py [THREADS]` (default: the cores this process may use; ~20 s).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tandem.decoding.bundle import BundleConfig, load_primary

MB = 1e6


def weight_bytes() -> tuple[int, int]:
    """(layer weights, head) bytes of the served primary as its kernels read them: the integer panels and their
    scales and offsets (`kernels.QPanels`)."""
    runner, _ = load_primary(BundleConfig(slots=1, max_len=64))

    def panel_bytes(w: object) -> int:
        panels = w.panels  # type: ignore[attr-defined]
        return sum(int(a.nbytes) for a in (panels.q, panels.scale, panels.offset) if a is not None)

    p = runner.params
    layers = sum(panel_bytes(w) for layer in p.layers for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    return layers, panel_bytes(p.head)


def read_gbps(nbytes: int, threads: int, passes: int = 15) -> tuple[float, float]:
    """(median, best) GB/s of `passes` reads of an nbytes buffer, each of `threads` threads taking the max of its own
    share (a reduction that keeps up with the cache, where numpy's sum does not)."""
    shares = [np.ones(nbytes // threads // 4, np.float32) for _ in range(threads)]
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for i in range(passes + 1):
            start = time.perf_counter()
            list(pool.map(np.max, shares))
            if i:  # the first pass faults the pages in
                times.append(time.perf_counter() - start)
    read = sum(a.nbytes for a in shares)
    return read / float(np.median(times)) / 1e9, read / min(times) / 1e9


def main(threads: int) -> None:
    layers, head = weight_bytes()
    sizes = {"layer weights": layers, "head": head, "layers + head": layers + head, "4 GB": 4_000_000_000}
    print(f"read bandwidth, {threads} threads, 15 passes: median / best")
    for name, n in sizes.items():
        median, best = read_gbps(n, threads)
        print(f"  {name:>14}: {n / MB:7.1f} MB  {median:5.1f} / {best:5.1f} GB/s  ({n / best / 1e6:6.2f} ms at best)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else len(os.sched_getaffinity(0)))
