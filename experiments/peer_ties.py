"""Where a peer's greedy tokens part from `primary`'s in a `tandem bench` report: at each first differing position,
our primary's logit margin of its own token over the peer's, and the peer's token's rank among ours (1 = our runner-up).
Usage: `.venv/bin/python experiments/peer_ties.py REPORT.json [MODE]` (MODE: a peer mode, default `llamacpp`; ~1 min).
The report must come from this build: the primary's tokens are regenerated here and checked against the report's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tandem.decoding.bundle import BundleConfig, load_bundle
from tandem.formats.tokenizer import chat_prompt_ids


def main(report_path: str, mode: str = "llamacpp") -> None:
    report = json.loads(Path(report_path).read_text())
    bundle = load_bundle(BundleConfig(slots=2, max_len=1024))
    runner = bundle.engine.primary
    for m in report["mismatches"][mode]:
        ids = chat_prompt_ids(bundle.tokenizer, report["prompts"][m["prompt"]]["prompt"])
        p = m["position"]
        ours = bundle.engine.generate(ids, mode="primary", max_tokens=p + 1).token_ids
        if ours[p] != m["expected"]:
            raise SystemExit(f"prompt {m['prompt']}: this build's token {p} is {ours[p]}, the report's {m['expected']}")
        logits = runner.forward(np.array([ids + ours[:p]], np.int32), rows=[1]).logits[0, -1].astype(np.float64)
        runner.truncate(1, 0)
        margin = logits[m["expected"]] - logits[m["got"]]
        rank = int((logits > logits[m["got"]]).sum())
        where = f"prompt {m['prompt']} token {p}"
        print(f"{where}: ours {m['expected']} over {mode}'s {m['got']} by {margin:.3f} logits, rank {rank}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
