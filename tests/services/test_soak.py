"""Soak: many requests through the three services with random client cancellations and deadlines; resident memory
stays flat and no session leaks. `TANDEM_SOAK_REQUESTS` sets the count (default 300; docs/testing.md runs 1,000)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import grpc
import pytest
from test_services import Stack

from tandemrpc.client import build_request

REQUESTS = int(os.environ.get("TANDEM_SOAK_REQUESTS", "300"))  # docs/testing.md's command runs 1,000
WARMUP = 300  # covers the shape buckets (each compiled drafting round or block adds resident memory once)


def rss_mb() -> float:
    """This process's resident set size now (the services run in it), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def stack(tiny_params) -> Iterator[Stack]:
    s = Stack(tiny_params)
    yield s
    s.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident set size")
def test_soak_with_random_cancellations(stack: Stack) -> None:
    rng = random.Random(0)
    modes = ["primary", "speed", "tandem-speed", "tandem"]
    outcomes = {"completed": 0, "cancelled": 0, "deadline": 0}
    rss = []
    start = time.monotonic()
    for i in range(WARMUP + REQUESTS):
        if i == WARMUP:
            rss.append(rss_mb())
        prompt = [rng.randrange(1, 48) for _ in range(rng.randrange(1, 12))]
        req = build_request(prompt, mode=rng.choice(modes), max_tokens=rng.randrange(1, 40), temperature=rng.choice(
            [0.0, 0.8]), seed=rng.randrange(1000))  # fmt: skip
        fate = rng.random()
        if fate < 0.25:  # cancel after a few chunks
            call = stack.client.stub.Generate(req)
            for _ in range(rng.randrange(1, 3)):
                if next(call, None) is None:
                    break
            call.cancel()
            outcomes["cancelled"] += 1
        elif fate < 0.35:  # a deadline that may expire mid-request
            try:
                list(stack.client.stub.Generate(req, timeout=rng.choice([0.001, 0.01, 0.05])))
                outcomes["completed"] += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                outcomes["deadline"] += 1
        else:
            chunks = list(stack.client.stub.Generate(req))
            assert chunks[-1].finish_reason != 0
            outcomes["completed"] += 1
    elapsed = time.monotonic() - start
    assert stack.settled_sessions(within_s=5.0) == 0
    rss.append(rss_mb())
    growth = rss[1] - rss[0]
    print(
        f"\nsoak: {REQUESTS} requests after {WARMUP} warm-up in {elapsed:.1f}s; "
        f"outcomes of all {WARMUP + REQUESTS}: {outcomes}, "
        f"RSS {rss[0]:.1f} -> {rss[1]:.1f} MiB ({growth:+.1f}), leaked sessions 0"
    )
    assert growth < 25.0, f"resident memory grew {growth:.1f} MiB over {REQUESTS} requests"
