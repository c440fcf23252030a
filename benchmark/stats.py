"""The figures of a run from its samples, all pure: one measured generation (`Sample`), TPOT, median / mean /
percentile, the pooled speculation counters, speedups, the microservice tax, identity checks. `loadtest` uses the same
definitions.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from benchmark.config import BASELINE


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generation as the client saw it, with the speculation counters its backend reports.

    Attributes:
        token_ids: the output tokens.
        ttft_s: request sent → first chunk carrying tokens (None: no token came).
        e2el_s: request sent → last chunk.
        finish_reason: "stop" or "length".
        rounds: verify rounds (None: the backend does not report speculation counters).
        drafted_tokens: drafts proposed.
        accepted_tokens: drafts kept.
        accepted_per_position: [j]: rounds that kept draft j+1.
        primary_calls: primary passes (None: unknown).
        drafter_calls: drafting requests (None: unknown).
        lookup_rounds: rounds whose drafts prompt lookup found (None: unknown).
        lookup_drafted_tokens: their drafts.
        lookup_accepted_tokens: and those kept.
        model_s: seconds the model services (or in-process workers) spent running model calls during the generation,
            their batch time summed (None: unknown); the rest of e2el_s is orchestration overhead.
    """

    token_ids: tuple[int, ...]
    ttft_s: float | None
    e2el_s: float
    finish_reason: str = "length"
    rounds: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    accepted_per_position: tuple[int, ...] = ()
    primary_calls: int | None = None
    drafter_calls: int | None = None
    lookup_rounds: int | None = None
    lookup_drafted_tokens: int | None = None
    lookup_accepted_tokens: int | None = None
    model_s: float | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.e2el_s if self.e2el_s > 0 else 0.0

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2el_s, self.ttft_s, self.output_tokens)


def tpot(e2el_s: float, ttft_s: float | None, output_tokens: int) -> float | None:
    """(E2EL − TTFT) / (output tokens − 1); None for requests with fewer than two output tokens."""
    if ttft_s is None or output_tokens < 2:
        return None
    return (e2el_s - ttft_s) / (output_tokens - 1)


def median(values: Iterable[float]) -> float | None:
    """The median (None for no values)."""
    xs = list(values)
    return statistics.median(xs) if xs else None


def mean(values: Iterable[float]) -> float | None:
    xs = list(values)
    return statistics.fmean(xs) if xs else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sum_positions(rows: Iterable[Sequence[int]]) -> list[int]:
    """Element-wise sum of per-position counts of different lengths."""
    out: list[int] = []
    for row in rows:
        out.extend([0] * (len(row) - len(out)))
        for j, n in enumerate(row):
            out[j] += n
    return out


def combine_repeats(repeats: Sequence[Sample]) -> Sample:
    """One prompt's repeats as one sample: median TTFT, E2EL and model time, the first repeat's tokens and counters."""
    if not repeats:
        raise ValueError("no samples")
    first = repeats[0]
    ttft = median(s.ttft_s for s in repeats if s.ttft_s is not None)
    e2el = median(s.e2el_s for s in repeats)
    assert e2el is not None
    known = [s.model_s for s in repeats if s.model_s is not None]
    model = median(known) if len(known) == len(repeats) else None
    return dataclasses.replace(first, ttft_s=ttft, e2el_s=e2el, model_s=model)


def summarize(per_prompt: Sequence[Sequence[Sample]]) -> dict[str, Any]:
    """The figures of one (mode, via) from its samples.

    Args:
        per_prompt: [i]: the repeats of prompt i.

    Returns:
        tokens_per_s (median over prompts of output tokens / E2EL) and its mean; ttft_s_{median,p90,mean,p99};
        tpot_s_{median,p90,mean}; e2el_s_median; pooled speculation counters (rounds, drafted_tokens,
        accepted_tokens, accepted_per_position, and of them the prompt lookup's: lookup_rounds, lookup_drafted_tokens,
        lookup_accepted_tokens) and the rates derived from them (mean_acceptance_length,
        acceptance_rate, acceptance_per_position; None without speculation); primary_calls_per_token and
        drafter_calls_per_token (None when unknown); model_s (model services' time, summed over prompts) and
        overhead (1 − model_s / summed E2EL: the share of the client's time spent outside model calls; None when
        unknown); deterministic (every repeat gave the same tokens); outputs (token ids per prompt); per_prompt (each
        prompt's figures).
    """
    rows = [combine_repeats(reps) for reps in per_prompt]
    tps = [s.tokens_per_s for s in rows]
    ttft = [s.ttft_s for s in rows if s.ttft_s is not None]
    tpots = [t for t in (s.tpot_s for s in rows) if t is not None]
    spec = [s for s in rows if s.rounds is not None]
    rounds = sum(s.rounds or 0 for s in spec)
    drafted = sum(s.drafted_tokens or 0 for s in spec)
    accepted = sum(s.accepted_tokens or 0 for s in spec)
    accepted_pos = sum_positions(s.accepted_per_position for s in spec)
    out_tokens = sum(s.output_tokens for s in rows)
    model_s = sum(s.model_s or 0.0 for s in rows) if all(s.model_s is not None for s in rows) else None
    e2el_s = sum(s.e2el_s for s in rows)

    def pooled(counts: list[int | None]) -> int | None:
        return sum(c or 0 for c in counts) if spec and all(c is not None for c in counts) else None

    def per_token(counts: list[int | None]) -> float | None:
        if not out_tokens or any(c is None for c in counts):
            return None
        return sum(c or 0 for c in counts) / out_tokens

    return {
        "prompts": len(rows),
        "output_tokens": out_tokens,
        "tokens_per_s": median(tps),
        "tokens_per_s_mean": mean(tps),
        "ttft_s_median": median(ttft),
        "ttft_s_p90": percentile(ttft, 90),
        "ttft_s_mean": mean(ttft),
        "ttft_s_p99": percentile(ttft, 99),
        "tpot_s_median": median(tpots),
        "tpot_s_p90": percentile(tpots, 90),
        "tpot_s_mean": mean(tpots),
        "e2el_s_median": median(s.e2el_s for s in rows),
        "rounds": rounds if spec else None,
        "drafted_tokens": drafted if spec else None,
        "accepted_tokens": accepted if spec else None,
        "accepted_per_position": accepted_pos,
        "mean_acceptance_length": 1.0 + accepted / rounds if rounds else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "acceptance_per_position": [a / rounds for a in accepted_pos] if rounds else [],
        "lookup_rounds": pooled([s.lookup_rounds for s in spec]),
        "lookup_drafted_tokens": pooled([s.lookup_drafted_tokens for s in spec]),
        "lookup_accepted_tokens": pooled([s.lookup_accepted_tokens for s in spec]),
        "primary_calls_per_token": per_token([s.primary_calls for s in rows]),
        "drafter_calls_per_token": per_token([s.drafter_calls for s in rows]),
        "model_s": model_s,
        "overhead": 1.0 - model_s / e2el_s if model_s is not None and e2el_s > 0 else None,
        "deterministic": all(all(r.token_ids == reps[0].token_ids for r in reps) for reps in per_prompt),
        "outputs": [list(s.token_ids) for s in rows],
        "per_prompt": [
            {
                "output_tokens": s.output_tokens,
                "finish_reason": s.finish_reason,
                "ttft_s": s.ttft_s,
                "tpot_s": s.tpot_s,
                "e2el_s": s.e2el_s,
                "tokens_per_s": s.tokens_per_s,
                "rounds": s.rounds,
                "drafted_tokens": s.drafted_tokens,
                "accepted_tokens": s.accepted_tokens,
                "primary_calls": s.primary_calls,
                "drafter_calls": s.drafter_calls,
                "lookup_rounds": s.lookup_rounds,
                "lookup_accepted_tokens": s.lookup_accepted_tokens,
                "model_s": s.model_s,
            }
            for s in rows
        ],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is not positive."""
    return a / b if a is not None and b is not None and b > 0 else None


def speedups(tokens_per_s: Mapping[str, float | None], base: str = BASELINE) -> dict[str, float | None]:
    """Each mode's tokens/s over the base mode's (the base maps to 1.0)."""
    return {m: ratio(v, tokens_per_s.get(base)) for m, v in tokens_per_s.items()}


def microservice_tax(
    in_process: Mapping[str, float | None], grpc: Mapping[str, float | None]
) -> dict[str, float | None]:
    """Per mode that ran both ways: in-process tokens/s ÷ gRPC tokens/s (1.0 = no tax; 1.25 = gRPC is 20 % slower)."""
    return {m: ratio(v, grpc[m]) for m, v in in_process.items() if m in grpc}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (a length difference counts); None if equal."""
    for j, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def mismatches(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[dict[str, int | None]]:
    """[{prompt, position, expected, got}] for each prompt whose tokens differ from the reference's: position is the
    first difference (the tokens before it agree), expected and got the two token ids there (None: that output had
    already ended)."""
    if len(reference) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(reference)} reference prompts")
    out: list[dict[str, int | None]] = []
    for i, (want, got) in enumerate(zip(reference, outputs, strict=True)):
        j = first_difference(want, got)
        if j is not None:
            out.append(
                {
                    "prompt": i,
                    "position": j,
                    "expected": int(want[j]) if j < len(want) else None,
                    "got": int(got[j]) if j < len(got) else None,
                }
            )
    return out


def block_cost_ratios(ms: Mapping[int, float]) -> dict[int, float]:
    """Each block size's cost relative to k = 1."""
    if 1 not in ms or ms[1] <= 0:
        raise ValueError("the block-cost curve needs a positive k = 1 entry")
    return {k: v / ms[1] for k, v in sorted(ms.items())}
