"""What a greedy speculative round at γ_max 1 costs, part by part: the primary's 2-token verify, the Tandem drafter's
round call (write the round's 2 primary states, feed one token, draft one), each alone back to back, and the drafter
right after a verify, as it runs in a round.
Usage: `.venv/bin/python experiments/round_cost.py` (~1 min). 256 cached positions; medians over 60 calls, three
rounds of measurements, so the VM's drift shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from tandem.decoding.bundle import BundleConfig, load_bundle
from tandem.model.router import MLPRouter

CONTEXT = 256


def per_call_ms(fn: Callable[[], object], calls: int = 60) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def main() -> None:
    bundle = load_bundle(BundleConfig(slots=2, max_len=1024))
    primary, worker = bundle.engine.primary, bundle.engine.drafters["tandem"]
    assert worker is not None
    drafter = worker.runner
    states = (len(drafter.cfg.tapped_layers), drafter.cfg.primary_d_model)
    primary.forward(np.ones((1, CONTEXT), np.int32), [0])
    primary.commit(0, CONTEXT)
    drafter.ingest(np.zeros((1, CONTEXT, *states), np.float32), rows=[0])
    router, top_k = None, 0  # the max-probability fallback, unless the drafter ships an MLP router (run on device)
    if isinstance(worker.router, MLPRouter):
        router, top_k = worker.router.device_params, worker.router.cfg.top_k

    def draft() -> None:  # one round's drafter call, as the worker makes it; then back to the same length
        drafter.draft_greedy([[5]], [0], [1], [0.8], router, top_k, hidden=[np.zeros((2, *states), np.float32)])
        drafter.truncate(0, CONTEXT)

    def verify() -> None:  # a 2-token verify whose argmax ids reach the host; not committed
        _ = primary.forward(np.ones((1, 2), np.int32), [0]).top

    def round_trip() -> None:
        verify()
        draft()

    for _ in range(5):
        round_trip()
    print(
        f"ms a call after {CONTEXT} cached positions: drafter alone | verify alone | verify, drafter | drafter's part"
    )
    for _ in range(3):
        alone, v = per_call_ms(draft), per_call_ms(verify)
        both = per_call_ms(round_trip)
        print(f"  {alone:5.2f} | {v:5.2f} | {both:5.2f} | {both - v:5.2f}")


if __name__ == "__main__":
    main()
