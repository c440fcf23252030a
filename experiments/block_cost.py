"""The primary's block cost alone: ms per `PrimaryRunner.forward` of k = 1..8 tokens after 256 cached tokens (median of
15 interleaved calls, as `tandem bench` measures it), as one JSON line. Usage: `experiments/block_cost.py [SLOTS]`; with
1 slot (the default, as `tandem bench` runs) the call reads the cache in place, with more it gathers its row. Compare
two commits in alternating processes (a kernel or flag changes per process), e.g. `for r in 1 2 3; do git checkout -q
BASE; .venv/bin/python experiments/block_cost.py; git checkout -q -; .venv/bin/python experiments/block_cost.py; done`
(~1 min per process; the dev install is editable, so it outranks PYTHONPATH; the kernel library is cached per
source)."""

from __future__ import annotations

import json
import platform
import sys

import tandem
from tandem.decoding.bundle import BundleConfig, load_primary
from tandem.decoding.costs import measure_block_cost
from tandem.model import kernels


def main(slots: int = 1, context: int = 256, max_k: int = 8) -> None:
    runner, _ = load_primary(BundleConfig(slots=slots, max_len=2 * context))
    ms = measure_block_cost(runner, context=context, max_k=max_k, calls=15)
    print(
        json.dumps(
            {
                "source": tandem.__file__,
                "cpu": platform.processor() or platform.machine(),
                "int8_kernel": kernels.available(),
                "kernel_isa": kernels.isa(),
                "slots": slots,
                "context": context,
                "ms": {k: round(v, 2) for k, v in ms.items()},
            }
        )
    )


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
