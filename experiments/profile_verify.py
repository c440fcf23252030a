"""Where a verify's time goes: a `jax.profiler` trace of 20 `PrimaryRunner.forward` calls of k tokens after 256 cached
ones, its XLA ops and custom calls summed per kind (custom calls by their FFI target: `tandem_qmatmul4_dot` the 30
layers' products, `tandem_qmatmul8_dot` the head, `tandem_attention`, `tandem_rms_norm`, `tandem_argmax`).
Usage: `.venv/bin/python experiments/profile_verify.py [K]` (default 8; ~30 s). The trace's own overhead inflates every
figure a little; compare kinds within one run.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

_DUMP = Path(tempfile.mkdtemp(prefix="tandem-profile-"))
# Before jax loads: per-op trace events on the CPU backend, and the optimized HLO to name each custom call's target.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true --xla_dump_to={_DUMP / 'hlo'}"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tandem.decoding import costs  # noqa: E402
from tandem.decoding.bundle import BundleConfig, load_primary  # noqa: E402

_CUSTOM_CALL = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*custom_call_target=\"(\w+)\"")


def main(k: int = 8, context: int = 256, calls: int = 20) -> None:
    runner, _ = load_primary(BundleConfig(slots=1, max_len=2 * context))
    runner.forward(costs._context_ids(context, runner.cfg.vocab_size), [0])
    runner.commit(0, context)
    block = np.ones((1, k), np.int32)
    for _ in range(3):  # compiles
        _ = runner.forward(block, [0]).top
    with jax.profiler.trace(str(_DUMP / "trace"), create_perfetto_trace=True):
        for _ in range(calls):
            _ = runner.forward(block, [0]).top
    targets = {}
    for path in (_DUMP / "hlo").glob("*forward_block*after_optimizations.txt"):
        for line in path.read_text().splitlines():
            if m := _CUSTOM_CALL.match(line):
                targets[m.group(1)] = m.group(2)
    (trace,) = (_DUMP / "trace").glob("**/*.trace.json.gz")
    ms: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("$", "end: ")) or "Execute" in name or "Pjit" in name:
            continue  # Python frames, completion markers and whole executions: not ops
        kind = targets.get(name) or name.rsplit(".", 1)[0]
        ms[kind] += event["dur"] / 1000 / calls
        count[kind] += 1 / calls
    print(f"k = {k} after {context} cached tokens, ms per verify ({calls} verifies traced):")
    for kind, v in ms.most_common(15):
        print(f"{v:8.3f} ms  {count[kind]:6.1f} per verify  {kind}")
    print(f"{sum(ms.values()):8.3f} ms  in all ops")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
