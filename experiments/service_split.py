"""Where a lone request's time goes through the services: per output token, the client's end-to-end time, the
Primary's and the Secondary's busy time (their `*_busy_seconds` metrics) and the rest (round trips, serialization,
the orchestrator), for `primary` and `tandem-speed` in turn.

Usage: start `tandem serve --state-file /tmp/tandem.json` (add `--no-payoff` to the orchestrator, e.g. a second one
on the same model services, as the through-the-services figures of docs/performance.md were taken, so tandem-speed
requests speculate), then
`.venv/bin/python experiments/service_split.py [STATE_FILE] [ORCHESTRATOR]` (~1 min). Prints one line per mode and pass.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import grpc

from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

MODES = {"primary": pb.MODE_PRIMARY, "tandem-speed": pb.MODE_TANDEM_SPEED}


def _metric(url: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets) on a Prometheus endpoint."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def main(state_file: str = "/tmp/tandem.json", target: str | None = None, passes: int = 2) -> None:
    with open(state_file) as f:
        state = json.load(f)
    with open("prompts/bench.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:8]
    metrics = state["metrics"]
    stub = pb_grpc.OrchestratorStub(grpc.insecure_channel(target or state["orchestrator"]))

    def counters() -> tuple[float, float, float]:
        return (
            _metric(metrics["primary"], "tandem_primary_busy_seconds"),
            _metric(metrics["primary"], "tandem_primary_batches"),
            _metric(metrics["secondary"], "tandem_secondary_busy_seconds"),
        )

    for _ in range(passes):
        for mode, enum in MODES.items():
            before, start, tokens = counters(), time.perf_counter(), 0
            for prompt in prompts:
                chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
                for chunk in stub.Generate(pb.GenerateRequest(chat=chat, mode=enum, max_tokens=64)):
                    tokens += len(chunk.token_ids)
            e2e = time.perf_counter() - start
            primary_s, batches, secondary_s = (b - a for a, b in zip(before, counters(), strict=True))
            ms = 1e3 / tokens
            print(
                f"{mode:13s} {tokens} tokens: {e2e * ms:.2f} ms a token end to end = Primary {primary_s * ms:.2f} "
                f"({batches / tokens:.2f} calls, {primary_s / batches * 1e3:.2f} ms each) + Secondary "
                f"{secondary_s * ms:.2f} + rest {(e2e - primary_s - secondary_s) * ms:.2f}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:3])
