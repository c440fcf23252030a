"""The load test's figures from per-request chunk timings, and the speculation counters diffed from the orchestrator's
Prometheus text. Pure: no Ray, no gRPC, no clock.

Definitions (docs/design.md, Metric definitions; as vLLM's `bench serve`, so the numbers compare with published
ones), over the completed requests of one run:

- TTFT: request sent → first chunk carrying tokens. E2EL: request sent → last chunk (the final one may carry none).
- ITL: the gaps between consecutive chunks carrying tokens; per-token ITL: each gap ÷ the tokens of the chunk that
  ends it (a speculative round streams several tokens in one chunk).
- TPOT: (E2EL − TTFT) ÷ (output tokens − 1), for requests with more than one output token.
- request_throughput: completed requests ÷ duration; output_throughput: their output tokens ÷ duration; goodput:
  completed requests meeting every SLO given ÷ duration (None when no SLO is given). A request without a TPOT (one
  token) meets a TPOT SLO; one without a token meets no TTFT SLO.
- Each latency as mean, p50 (the median), p90 and p99 in milliseconds (percentiles interpolate linearly).
- Speculation: acceptance rate = accepted ÷ drafted tokens; mean acceptance length = 1 + accepted ÷ drafts (the
  primary's own token counts); accepted_per_position[j]: drafts whose token j + 1 was accepted.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmark.metrics import FALLBACK_COUNTERS
from benchmark.stats import mean, percentile, sum_positions, tpot

OUTCOMES = ("completed", "rejected", "failed")
MAX_ERRORS = 5  # distinct error messages kept per run

# Prometheus sample names (prometheus_client appends _total to counters) -> report keys.
SPEC_COUNTERS = {
    "tandem_spec_num_drafts_total": "drafts",
    "tandem_spec_num_draft_tokens_total": "draft_tokens",
    "tandem_spec_num_accepted_tokens_total": "accepted_tokens",
}
PER_POSITION_COUNTER = "tandem_spec_num_accepted_tokens_per_pos_total"  # label "position": 0 = the first draft
# Speculative requests the orchestrator ran primary-only, by why: the load (from the start or midway) or the payoff.
PRIMARY_ONLY_COUNTERS = {
    "tandem_load_shed_total": "load_shed",
    "tandem_speculation_skipped_total": "speculation_skipped",
}


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request as its virtual user saw it.

    Attributes:
        index: the request's number in its run (its prompt: prompts[index % len(prompts)]).
        outcome: "completed", "rejected" (RESOURCE_EXHAUSTED: the server's queues were full) or "failed".
        chunk_s: seconds from sending the request to each chunk that carried tokens.
        chunk_tokens: the tokens in each of those chunks.
        e2el_s: sent → last chunk (None unless completed).
        error: "CODE: details" of a rejected or failed request.
        finish_reason: "stop" or "length" (completed requests).
        rounds: speculative rounds (drafts), from the final chunk's stats.
        drafted_tokens: tokens drafted, from the final chunk's stats.
        accepted_tokens: drafted tokens accepted, from the final chunk's stats.
        accepted_per_position: [j]: rounds that accepted draft j + 1, from the final chunk's stats.
    """

    index: int
    outcome: str
    chunk_s: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    e2el_s: float | None = None
    error: str = ""
    finish_reason: str = ""
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        if len(self.chunk_s) != len(self.chunk_tokens):
            raise ValueError("chunk_s and chunk_tokens must have the same length")

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] if self.chunk_s else None

    @property
    def tpot_s(self) -> float | None:
        return None if self.e2el_s is None else tpot(self.e2el_s, self.ttft_s, self.output_tokens)

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_s)]

    @property
    def itl_per_token_s(self) -> list[float]:
        return [gap / n for gap, n in zip(self.itl_s, self.chunk_tokens[1:], strict=True)]


def distribution(seconds: Sequence[float]) -> dict[str, Any]:
    """mean, p50 (the median), p90 and p99 of latencies given in seconds, in milliseconds; n: how many (all None
    when there are none)."""
    ms = [1000.0 * x for x in seconds]
    return {
        "mean": mean(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "n": len(ms),
    }


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> bool:
    """Whether a completed request meets every SLO given (None: no such SLO)."""
    if record.outcome != "completed":
        return False
    ttft, tpot_s = record.ttft_s, record.tpot_s
    if slo_ttft_ms is not None and (ttft is None or 1000.0 * ttft > slo_ttft_ms):
        return False
    return slo_tpot_ms is None or tpot_s is None or 1000.0 * tpot_s <= slo_tpot_ms


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    """The figures of one run (see the module docstring).

    Args:
        records: every request of the run, in any order.
        duration_s: first request sent → last request finished, on the driver's clock.
        slo_ttft_ms: TTFT SLO for goodput (None: none).
        slo_tpot_ms: TPOT SLO for goodput (None: none).

    Returns:
        completed, rejected, failed (counts); errors (up to MAX_ERRORS distinct messages, in request order);
        duration_s; total_output_tokens; request_throughput, output_throughput, goodput (per second; None for a
        zero duration, goodput also without an SLO); slo {ttft_ms, tpot_ms}; ttft, tpot, itl, itl_per_token, e2el:
        `distribution`s in ms.
    """
    done = [r for r in records if r.outcome == "completed"]
    errors: list[str] = []
    for r in sorted(records, key=lambda r: r.index):
        if r.error and r.error not in errors and len(errors) < MAX_ERRORS:
            errors.append(r.error)
    tokens = sum(r.output_tokens for r in done)

    def per_s(count: int) -> float | None:
        return count / duration_s if duration_s > 0 else None

    has_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in done)
    return {
        **{outcome: sum(r.outcome == outcome for r in records) for outcome in OUTCOMES},
        "errors": errors,
        "duration_s": duration_s,
        "total_output_tokens": tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(tokens),
        "goodput": per_s(good) if has_slo else None,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "ttft": distribution([t for r in done if (t := r.ttft_s) is not None]),
        "tpot": distribution([t for r in done if (t := r.tpot_s) is not None]),
        "itl": distribution([g for r in done for g in r.itl_s]),
        "itl_per_token": distribution([g for r in done for g in r.itl_per_token_s]),
        "e2el": distribution([r.e2el_s for r in done if r.e2el_s is not None]),
    }


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per request, in order: index, outcome, output_tokens, ttft_ms, tpot_ms, e2el_ms (what the CDF plot reads)."""

    def ms(x: float | None) -> float | None:
        return None if x is None else 1000.0 * x

    return [
        {
            "index": r.index,
            "outcome": r.outcome,
            "output_tokens": r.output_tokens,
            "ttft_ms": ms(r.ttft_s),
            "tpot_ms": ms(r.tpot_s),
            "e2el_ms": ms(r.e2el_s),
        }
        for r in sorted(records, key=lambda r: r.index)
    ]


# -- speculation -------------------------------------------------------------------------------------------------


def spec_summary(
    drafts: float, draft_tokens: float, accepted_tokens: float, accepted_per_position: Sequence[float]
) -> dict[str, Any]:
    """drafts, draft_tokens, accepted_tokens, acceptance_rate, mean_acceptance_length, accepted_per_position and
    acceptance_per_position (÷ drafts) from pooled counters (rates None without drafts)."""
    return {
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted_tokens,
        "acceptance_rate": accepted_tokens / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": 1.0 + accepted_tokens / drafts if drafts else None,
        "accepted_per_position": list(accepted_per_position),
        "acceptance_per_position": [a / drafts for a in accepted_per_position] if drafts else [],
    }


def spec_from_records(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """`spec_summary` pooled over the final chunks' stats of the completed requests."""
    done = [r for r in records if r.outcome == "completed"]
    return spec_summary(
        sum(r.rounds for r in done),
        sum(r.drafted_tokens for r in done),
        sum(r.accepted_tokens for r in done),
        sum_positions(r.accepted_per_position for r in done),
    )


CounterKey = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def counters(text: str) -> dict[CounterKey, float]:
    """Every counter sample (name ending in _total) of a Prometheus text exposition."""
    out: dict[CounterKey, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total"):
                out[s.name, tuple(sorted(s.labels.items()))] = float(s.value)
    return out


def metrics_delta(before: str, after: str) -> dict[str, Any]:
    """What the orchestrator counted between two scrapes of its Prometheus text.

    Returns:
        spec: `spec_summary` of the tandem_spec_num_* counters' increases; server_counters: the increases of
        benchmark.metrics.FALLBACK_COUNTERS (drafter fallbacks, primary failovers); primary_only: those of
        PRIMARY_ONLY_COUNTERS (speculative requests run primary-only by the load or by the speculation payoff).
    """
    old, new = counters(before), counters(after)
    delta = {key: value - old.get(key, 0.0) for key, value in new.items()}
    names = (*SPEC_COUNTERS, *FALLBACK_COUNTERS, *PRIMARY_ONLY_COUNTERS)
    totals = {name: sum(v for (n, _), v in delta.items() if n == name) for name in names}
    by_position = {int(dict(labels)["position"]): v for (n, labels), v in delta.items() if n == PER_POSITION_COUNTER}
    per_position = [by_position.get(j, 0.0) for j in range(max(by_position, default=-1) + 1)]
    drafts, draft_tokens, accepted = (totals[name] for name in SPEC_COUNTERS)
    return {
        "spec": spec_summary(drafts, draft_tokens, accepted, per_position),
        "server_counters": {key: totals[name] for name, key in FALLBACK_COUNTERS.items()},
        "primary_only": {key: totals[name] for name, key in PRIMARY_ONLY_COUNTERS.items()},
    }
