"""Two orchestrators in front of one Primary and one Secondary, one stream each (the GKE overlay runs two replicas):
output tokens/s of each mode in A B B A order, with the drafts the responses report. Usage: start `tandem serve
--state-file /tmp/tandem.json`, a second orchestrator on the same model services (`python -m orchestrator --port 50060
--primary "$(jq -r .primary /tmp/tandem.json)" --secondary "$(jq -r .secondary /tmp/tandem.json)"` plus the serve's
`--max-len`), then `experiments/two_orchestrators.py 127.0.0.1:50050,127.0.0.1:50060 [REQUESTS_PER_STREAM]`: one JSON
line per run (after one unmeasured primary run). Each stream sends the bench prompts as chat, 64 tokens each, greedy."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from tandemrpc.client import TandemClient

PROMPTS_FILE = Path(__file__).parents[1] / "prompts" / "bench.jsonl"
PROMPTS = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines()]


def run(targets: list[str], mode: str, requests: int) -> dict[str, object]:
    """Every target gets one stream of `requests` requests, one after another; all streams run at once."""
    tokens, drafted = [0] * len(targets), [0] * len(targets)

    def stream(i: int) -> None:
        with TandemClient(targets[i], timeout_s=120) as client:
            for j in range(requests):
                chat = [{"role": "user", "content": PROMPTS[(i * requests + j) % len(PROMPTS)]}]
                for r in client.generate(chat, mode=mode, max_tokens=64):
                    tokens[i] += len(r.token_ids)
                    drafted[i] += r.stats.drafted_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rate = round(sum(tokens) / wall, 1)
    return {"mode": mode, "output_tok_s": rate, "drafted": sum(drafted), "wall_s": round(wall, 1)}


def main(targets: str, requests: int = 8) -> None:
    streams = targets.split(",")
    run(streams, "primary", requests)  # unmeasured: connections, first shapes
    for mode in ("primary", "tandem-speed", "tandem-speed", "primary", "primary", "tandem-speed"):
        print(json.dumps(run(streams, mode, requests)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
