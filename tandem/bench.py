"""`tandem bench`: every mode on the same prompts, in process and through gRPC, in one run.

    report = run(BenchConfig(modes=("primary", "tandem-speed"), vias=("in-process",)), prompts, engine=engine)
    print(render_markdown(report))

What is measured (ANCHORS.md definitions, vLLM's `bench serve`):

- Greedy, batch 1, one request at a time. Prompts are token ids (the command line renders each prompt with the chat
  template, as `tandem generate --chat` does, and sends the same ids in process and through gRPC).
- The runs are interleaved: for each prompt, each (mode, via) in turn, so drift (thermal, other load) hits every mode
  alike. Before them, one warm-up generation per (mode, via) of the longest prompt at full length, so every compiled
  shape the measured runs need (blocks and contexts are bucketed by powers of two) exists before the clock runs.
- Times are taken on the client side: TTFT = request sent → first chunk carrying tokens; E2EL = request sent → last
  chunk; TPOT = (E2EL − TTFT) / (output tokens − 1); tokens/s = output tokens / E2EL. Per mode: the median over
  prompts (TTFT also p90, mean, p99).
- Speculation counters are pooled over prompts, as vLLM's Prometheus counters are: mean acceptance length =
  1 + accepted / rounds (`GenerationStats.mean_acceptance_length`), acceptance rate = accepted / drafted, acceptance
  per position j = rounds accepting draft j / rounds (vLLM's per-position rate).
- Primary calls per token: in process, `GenerationStats.primary_calls`; through gRPC, the chunks carrying tokens (the
  orchestrator streams one per primary pass; a last pass that only meets a stop token sends none). Drafter calls per
  token: drafting requests, one per round (`GenerationStats.drafter_calls`, equal to `rounds`).
- `identical`: per mode, whether every prompt's token ids equal the primary's (the losslessness check).
- The block-cost curve: ms per `PrimaryRunner.forward` of k = 1..16 tokens after a prefilled context; blocks are
  padded to a power of two, so the curve is a staircase. The drafter step: ms per `DrafterRunner.step` of one token.

The report (a JSON-able dict, see `build_report`) renders to markdown with `render_markdown` (also what
`tandem bench-report` runs) and to a PNG with `render_plot`. This module imports JAX only through the engine it is
given and gRPC only when a gRPC target is measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tandem.config import MODES, SamplingParams, SpecConfig
from tandem.decoding.costs import measure_block_costs, measure_drafter_step
from tandem.formats.tokenizer import chat_prompt_ids

if TYPE_CHECKING:
    from tandem.decoding.bundle import BundleConfig
    from tandem.decoding.engine import Engine
    from tandem.model.primary import PrimaryRunner
    from tandem.serve import ServeStack

SCHEMA = "tandem-bench/1"
VIAS = ("in-process", "grpc")
VIA_CHOICES = {"in-process": ("in-process",), "grpc": ("grpc",), "both": ("in-process", "grpc")}
PEER_MODES = ("hf", "hf-assisted")  # a peer implementation (tandem.peer_hf), run in this process
LOSSY_MODES = frozenset({"tandem"})  # standalone Tandem keeps drafts unverified: differing from primary is by design
BASELINE = "primary"
REPO_DIR = Path(__file__).resolve().parent.parent


# -- configuration and inputs -------------------------------------------------------------------------------------


def split_mode(label: str) -> tuple[str, SpecConfig | None]:
    """A mode label, `MODE` or `MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED]`, as (engine mode, its own settings or
    None).

    Raises:
        ValueError: settings that are not three or four numbers, or out of range.
    """
    mode, sep, settings = label.partition("@")
    if not sep:
        return mode, None
    parts = settings.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError("expected three or four values")
        min_accepted = float(parts[3]) if len(parts) == 4 else SpecConfig.min_accepted
        return mode, SpecConfig(
            tau_first=float(parts[0]), tau=float(parts[1]), gamma_max=int(parts[2]), min_accepted=min_accepted
        )
    except ValueError as e:
        raise ValueError(f"mode {label!r}: expected MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED] ({e})") from None


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures.

    Attributes:
        modes: engine modes (tandem.config.MODES), run in this order; must include "primary" (the baseline). A mode
            may carry its own speculation settings as `MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED]` (e.g.
            `tandem-speed@0:0.8:7`),
            so settings are compared like modes: interleaved, in one run, the label keying every result.
        vias: "in-process" and/or "grpc".
        max_tokens: tokens generated per prompt.
        gamma_max: most tokens drafted per round (sent explicitly over gRPC too, so both vias draft alike).
        tau: keep drafting while the router's confidence >= tau.
        tau_first: a round drafts at all only if the router's confidence in its first draft reaches this.
        min_accepted: speculation pauses while a request's rounds keep fewer drafts on average
            (`tandem.decoding.rounds.Pacer`).
        repeats: passes over the prompt set; per prompt, times are the median over repeats.
        warmup_tokens: tokens of each warm-up generation (None: max_tokens).
        block_cost_context: cached tokens before the block-cost calls (0: an empty cache; None: skip the curve).
        block_cost_max_k: the curve covers k = 1..block_cost_max_k.
        block_cost_calls: timed calls per k (median), after two warm-up calls.
        peer: "hf" adds the modes hf and hf-assisted (tandem.peer_hf.HFPeer, in process); None: no peer.
        prefix_cache_rows: the Primary's prefix cache (`tandem.model.kvcache.PrefixCache`) in process and in services
            started here. 0 (off) by default: the modes run the same prompts one after another, and with the cache
            every mode but the first on a prompt would reuse all of it but its last token.
    """

    modes: tuple[str, ...] = MODES
    vias: tuple[str, ...] = VIAS
    max_tokens: int = 128
    gamma_max: int = SpecConfig.gamma_max
    tau: float = SpecConfig.tau
    tau_first: float = SpecConfig.tau_first
    min_accepted: float = SpecConfig.min_accepted
    repeats: int = 1
    warmup_tokens: int | None = None
    block_cost_context: int | None = 256
    block_cost_max_k: int = 16
    block_cost_calls: int = 9
    peer: str | None = None
    prefix_cache_rows: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if split_mode(m)[0] not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
        if BASELINE not in self.modes:
            raise ValueError(f"modes must include {BASELINE!r}: it is the baseline of speedups and identity checks")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes repeat: {', '.join(self.modes)}")
        if not self.vias or any(v not in VIAS for v in self.vias) or len(set(self.vias)) != len(self.vias):
            raise ValueError(f"vias must be distinct values of {', '.join(VIAS)}, got {self.vias}")
        if self.max_tokens < 1 or self.repeats < 1 or self.block_cost_max_k < 1 or self.block_cost_calls < 1:
            raise ValueError("max_tokens, repeats, block_cost_max_k and block_cost_calls must be >= 1")
        if self.prefix_cache_rows < 0:
            raise ValueError(f"prefix_cache_rows must be >= 0, got {self.prefix_cache_rows}")
        if self.warmup_tokens is not None and self.warmup_tokens < 0:
            raise ValueError("warmup_tokens must be >= 0 (0: no warm-up)")
        if self.block_cost_context is not None and self.block_cost_context < 0:
            raise ValueError("block_cost_context must be >= 0")
        if self.peer not in (None, "hf"):
            raise ValueError(f"unknown peer {self.peer!r}; expected 'hf'")
        if self.peer is not None and "in-process" not in self.vias:
            raise ValueError("a peer runs in process and is compared with the in-process primary: add in-process")
        for mode in self.modes:
            self.spec_of(mode)  # raises ValueError for a bad gamma_max, tau or tau_first

    @property
    def spec(self) -> SpecConfig:
        return SpecConfig(
            gamma_max=self.gamma_max, tau=self.tau, tau_first=self.tau_first, min_accepted=self.min_accepted
        )

    def spec_of(self, mode: str) -> SpecConfig:
        """The settings a mode label runs with: its own (`MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED]`), else the
        run's."""
        own = split_mode(mode)[1]
        return own if own is not None else self.spec

    @property
    def all_modes(self) -> tuple[str, ...]:
        """The engine modes, then the peer's."""
        return self.modes + (PEER_MODES if self.peer else ())

    def vias_of(self, mode: str) -> tuple[str, ...]:
        """The vias a mode runs through (a peer only in process)."""
        return ("in-process",) if mode in PEER_MODES else self.vias


@dataclasses.dataclass(frozen=True)
class BenchPrompt:
    """One prompt of the set: its text and category (for the report) and the token ids that are sent."""

    text: str
    category: str
    ids: tuple[int, ...]


def read_prompts(path: str | os.PathLike[str], limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, category) pairs from a JSONL file of {"prompt": str, "category": str (optional)} objects.

    Raises:
        ValueError: a line is not such an object, or the file holds no prompt.
    """
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(f"{path}:{n}: expected a JSON object with a non-empty string 'prompt'")
            rows.append((row["prompt"], str(row.get("category", ""))))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows[:limit] if limit is not None else rows


# -- one measured generation ----------------------------------------------------------------------------------------


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


# -- statistics --------------------------------------------------------------------------------------------------


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
        accepted_tokens, accepted_per_position) and the rates derived from them (mean_acceptance_length,
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


def mismatches(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[dict[str, int]]:
    """[{prompt, position}] for each prompt whose tokens differ from the reference's (position: first difference)."""
    if len(reference) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(reference)} reference prompts")
    out = []
    for i, (want, got) in enumerate(zip(reference, outputs, strict=True)):
        j = first_difference(want, got)
        if j is not None:
            out.append({"prompt": i, "position": j})
    return out


def block_cost_ratios(ms: Mapping[int, float]) -> dict[int, float]:
    """Each block size's cost relative to k = 1."""
    if 1 not in ms or ms[1] <= 0:
        raise ValueError("the block-cost curve needs a positive k = 1 entry")
    return {k: v / ms[1] for k, v in sorted(ms.items())}


# -- backends: where a generation runs ----------------------------------------------------------------------------


class Backend(Protocol):
    """Runs one greedy generation and reports it as the client saw it."""

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample: ...


class InProcessBackend:
    """The in-process engine; TTFT and E2EL are taken around `Engine.stream` like a client would."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _busy_s(self) -> float:
        """The workers' model time so far (each drafter worker once, though two modes share the Tandem one)."""
        drafters = {id(w): w for w in self.engine.drafters.values() if w is not None}.values()
        return self.engine.primary_worker.busy_s + sum((w.busy_s for w in drafters), 0.0)

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        tokens: list[int] = []
        ttft: float | None = None
        busy = self._busy_s()
        start = time.perf_counter()
        stream = self.engine.stream(prompt_ids, mode=mode, max_tokens=max_tokens, sampling=SamplingParams(), spec=spec)
        while True:
            try:
                chunk = next(stream)
            except StopIteration as done:
                result = done.value
                break
            if chunk and ttft is None:
                ttft = time.perf_counter() - start
            tokens.extend(chunk)
        e2el = time.perf_counter() - start
        s = result.stats
        return Sample(
            token_ids=tuple(tokens),
            ttft_s=ttft,
            e2el_s=e2el,
            finish_reason=result.finish_reason,
            rounds=s.rounds,
            drafted_tokens=s.drafted_tokens,
            accepted_tokens=s.accepted_tokens,
            accepted_per_position=tuple(s.accepted_per_position),
            primary_calls=s.primary_calls,
            drafter_calls=s.drafter_calls,
            model_s=self._busy_s() - busy,
        )


class GrpcBackend:
    """The public Orchestrator API; the counters come from the final GenerateResponse chunk.

    Args:
        target: the orchestrator's HOST:PORT.
        timeout_s: deadline per request.
        service_metrics: the Prometheus endpoints of the model services behind it; their busy-seconds gauges, read
            before and after each request (outside its timing), give the request's model time (empty: unknown).
    """

    def __init__(self, target: str, timeout_s: float | None = 600.0, service_metrics: Sequence[str] = ()) -> None:
        from tandemrpc.client import TandemClient

        self.target, self.service_metrics = target, tuple(service_metrics)
        self.client = TandemClient(target, timeout_s=timeout_s)

    def _busy_s(self) -> float | None:
        return sum(busy_seconds(url) for url in self.service_metrics) if self.service_metrics else None

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        from tandemrpc.client import IncompleteStreamError
        from tandemrpc.convert import FINISH_NAMES
        from tandemrpc.v1 import tandem_pb2 as pb

        tokens: list[int] = []
        ttft: float | None = None
        passes = 0
        final: Any = None
        busy = self._busy_s()
        start = time.perf_counter()
        chunks = self.client.generate(
            [int(t) for t in prompt_ids],
            mode=mode,
            max_tokens=max_tokens,
            gamma_max=spec.gamma_max,
            tau=spec.tau,
            tau_first=spec.tau_first,
            min_accepted=spec.min_accepted,
        )
        for chunk in chunks:  # read to the end: the last chunk carries the counters
            if chunk.token_ids:
                if ttft is None:
                    ttft = time.perf_counter() - start
                passes += 1
                tokens.extend(chunk.token_ids)
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                final = chunk
        e2el = time.perf_counter() - start
        if final is None:
            raise IncompleteStreamError(f"{self.target}: the stream ended without its final chunk")
        after = self._busy_s()
        st = final.stats
        return Sample(
            token_ids=tuple(tokens),
            ttft_s=ttft,
            e2el_s=e2el,
            finish_reason=FINISH_NAMES.get(final.finish_reason, str(final.finish_reason)),
            rounds=st.rounds,
            drafted_tokens=st.drafted_tokens,
            accepted_tokens=st.accepted_tokens,
            accepted_per_position=tuple(st.accepted_per_position),
            primary_calls=passes,
            drafter_calls=st.rounds + st.declined_rounds,  # the request loop asks the drafter once per round
            model_s=None if busy is None or after is None else after - busy,
        )

    def close(self) -> None:
        self.client.close()


class PeerResultLike(Protocol):
    """What a peer's generate returns (tandem.peer_hf.PeerResult)."""

    @property
    def token_ids(self) -> list[int]: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def elapsed_s(self) -> float: ...
    @property
    def assistant_calls(self) -> int: ...


class Peer(Protocol):
    """Another implementation run on the same prompts (tandem.peer_hf.HFPeer)."""

    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def generate(self, prompt_ids: list[int], max_tokens: int, *, assisted: bool) -> PeerResultLike: ...


class PeerBackend:
    """Modes hf (the peer's plain greedy decoding) and hf-assisted (its assisted generation); the peer times itself."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        if mode not in PEER_MODES:
            raise ValueError(f"the peer runs modes {', '.join(PEER_MODES)}, not {mode!r}")
        res = self.peer.generate([int(t) for t in prompt_ids], max_tokens, assisted=mode == "hf-assisted")
        ids = tuple(int(t) for t in res.token_ids)
        return Sample(
            token_ids=ids,
            ttft_s=res.ttft_s if ids else None,
            e2el_s=res.elapsed_s,
            finish_reason="length" if len(ids) >= max_tokens else "stop",
            drafter_calls=res.assistant_calls if mode == "hf-assisted" else 0,
        )


def load_peer(name: str, bundle_cfg: BundleConfig) -> Peer:
    """The peer implementation `name` ("hf"), imported only now.

    Raises:
        SystemExit: its dependencies (torch, transformers) are not installed.
    """
    if name != "hf":
        raise SystemExit(f"tandem bench: unknown peer {name!r}")
    try:
        from tandem.peer_hf import HFPeer
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise SystemExit(
            f"tandem bench: --peer hf needs torch and transformers ({missing} is missing): pip install '.[peer]'"
        ) from None
    peer: Peer = HFPeer(bundle_cfg)
    return peer


# -- costs of single calls (the measuring itself is tandem.decoding.costs) ------------------------------------


def xla_twin(primary: PrimaryRunner) -> PrimaryRunner | None:
    """A runner on the same float32 weights with every product in XLA, when `primary` runs the int8 kernel (else None).

    Shares the weights (no copy); has its own cache of the same shape, so the same compiled paths are measured.
    """
    from tandem.model import kernels
    from tandem.model.primary import float_only

    if not kernels.available() or primary.params.head_panels is None:
        return None
    return type(primary)(
        primary.cfg, float_only(primary.params), taps=primary.taps, batch=primary.batch, max_len=primary.max_len
    )


# -- the machine -------------------------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(REPO_DIR), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _int8_kernel() -> bool:
    """Whether a primary loaded on this machine, with this environment, runs its products in `tandem.model.kernels`."""
    from tandem.model import kernels

    return kernels.available()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, Python, JAX, whether the int8 kernel runs, and the date and git commit of this run."""
    mem = _proc_field("/proc/meminfo", "MemTotal")  # "131072000 kB"
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "grpcio": _version("grpcio"),
        "int8_kernel": _int8_kernel(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
    }


# The orchestrator's counters of degraded requests (Prometheus sample name -> report key).
FALLBACK_COUNTERS = {
    "tandem_drafter_fallbacks_total": "drafter_fallbacks",
    "tandem_primary_failovers_total": "failovers",
}


def fetch_metrics(metrics_url: str, timeout_s: float = 5.0) -> str:
    """The Prometheus text exposition a service serves at `metrics_url`."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
        return str(resp.read().decode("utf-8", "replace"))


def _samples(metrics_url: str, timeout_s: float) -> Iterator[Any]:
    """Every sample of a service's Prometheus exposition, parsed by prometheus_client (as loadtest.metrics does)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(fetch_metrics(metrics_url, timeout_s)):
        yield from family.samples


def busy_seconds(metrics_url: str, timeout_s: float = 5.0) -> float:
    """A model service's time spent running model calls so far: its `tandem_*_busy_seconds` gauges summed."""
    return sum(
        float(s.value)
        for s in _samples(metrics_url, timeout_s)
        if s.name.startswith("tandem_") and s.name.endswith("_busy_seconds")
    )


def orchestrator_counters(metrics_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The orchestrator's fallback counters from its Prometheus endpoint (nonzero: some requests ran degraded)."""
    out: dict[str, float] = {}
    for s in _samples(metrics_url, timeout_s):
        if s.name in FALLBACK_COUNTERS:
            key = FALLBACK_COUNTERS[s.name]
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


# -- the run -----------------------------------------------------------------------------------------------------


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    cfg: BenchConfig,
    prompts: Sequence[BenchPrompt],
    *,
    engine: Engine | None = None,
    target: str | None = None,
    peer: Peer | None = None,
    args: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    metrics_url: str | None = None,
    service_metrics: Sequence[str] = (),
    log: Callable[[str], None] = log_stderr,
) -> dict[str, Any]:
    """Runs the benchmark and returns its report (see `build_report`).

    Args:
        cfg: what to measure.
        prompts: the prompt set (token ids are sent as they are).
        engine: the in-process engine (needed for via in-process and for the block-cost curve).
        target: the orchestrator's HOST:PORT (needed for via grpc).
        peer: the peer implementation when cfg.peer is set.
        args: the command line's arguments, recorded in the report (default: the config).
        extra: more top-level report entries (e.g. where the drafters came from).
        metrics_url: the orchestrator's Prometheus endpoint; its fallback counters are recorded if given.
        service_metrics: the model services' Prometheus endpoints, for each gRPC request's model time (overhead).
        log: progress lines.

    Raises:
        ValueError: a backend the config needs was not given, or the prompt set is empty.
    """
    if not prompts:
        raise ValueError("no prompts")
    if "in-process" in cfg.vias and engine is None:
        raise ValueError("via in-process needs an engine")
    if "grpc" in cfg.vias and target is None:
        raise ValueError("via grpc needs a target")
    if cfg.peer is not None and peer is None:
        raise ValueError(f"cfg.peer={cfg.peer!r} needs a peer")
    backends: dict[tuple[str, str], Backend] = {}
    grpc_backend = (
        GrpcBackend(target, service_metrics=service_metrics) if "grpc" in cfg.vias and target is not None else None
    )
    try:
        for mode in cfg.all_modes:
            for via in cfg.vias_of(mode):
                if mode in PEER_MODES:
                    assert peer is not None
                    backends[via, mode] = PeerBackend(peer)
                elif via == "grpc":
                    assert grpc_backend is not None
                    backends[via, mode] = grpc_backend
                else:
                    assert engine is not None
                    backends[via, mode] = InProcessBackend(engine)
        counters_before = orchestrator_counters(metrics_url) if metrics_url else None

        warm_tokens = cfg.max_tokens if cfg.warmup_tokens is None else cfg.warmup_tokens
        if warm_tokens:
            longest = max(prompts, key=lambda p: len(p.ids))
            if peer is not None:
                peer.warmup()
            for (via, mode), backend in backends.items():
                t0 = time.perf_counter()
                backend.generate(longest.ids, split_mode(mode)[0], warm_tokens, cfg.spec_of(mode))
                log(f"warm-up {mode} ({via}): {time.perf_counter() - t0:.2f}s")

        samples: dict[tuple[str, str], list[list[Sample]]] = {key: [[] for _ in prompts] for key in backends}
        total = cfg.repeats * len(prompts) * len(backends)
        n = 0
        for r in range(cfg.repeats):
            for i, prompt in enumerate(prompts):
                # Interleaved: each mode in turn on this prompt, in reverse order every other time (A B B A ...), so
                # that drift on a shared machine hits every mode alike.
                turns = list(backends.items())
                for (via, mode), backend in turns if (r * len(prompts) + i) % 2 == 0 else turns[::-1]:
                    s = backend.generate(prompt.ids, split_mode(mode)[0], cfg.max_tokens, cfg.spec_of(mode))
                    samples[via, mode][i].append(s)
                    n += 1
                    rep = f" repeat {r + 1}" if cfg.repeats > 1 else ""
                    log(
                        f"[{n}/{total}] prompt {i + 1}{rep} {mode} ({via}): {s.output_tokens} tokens in "
                        f"{s.e2el_s:.2f}s, {s.tokens_per_s:.1f} tok/s"
                    )
        counters = None
        if metrics_url and counters_before is not None:
            after = orchestrator_counters(metrics_url)
            counters = {k: v - counters_before.get(k, 0.0) for k, v in after.items()}
    finally:
        if grpc_backend is not None:
            grpc_backend.close()

    block_ms: dict[int, float] | None = None
    block_ms_xla: dict[int, float] | None = None
    drafter_ms: dict[str, float] | None = None
    if engine is not None and cfg.block_cost_context is not None:
        calls = cfg.block_cost_calls
        twin = xla_twin(engine.primary)  # the int8 kernel's baseline, measured in the same interleaving
        costs = measure_block_costs(
            [engine.primary, *([twin] if twin is not None else [])],
            context=cfg.block_cost_context,
            max_k=cfg.block_cost_max_k,
            calls=calls,
        )
        block_ms, block_ms_xla = costs[0], (costs[1] if twin is not None else None)
        del twin
        log(f"block cost after {cfg.block_cost_context} tokens: k=1 {block_ms[1]:.2f} ms")
        drafter_ms = {}
        for name, key in (("tandem", "tandem-speed"), ("vanilla", "speed")):
            worker = engine.drafters.get(key)
            if worker is not None:
                drafter_ms[name] = measure_drafter_step(worker.runner, context=cfg.block_cost_context, calls=calls)
                log(f"{name} drafter step: {drafter_ms[name]:.2f} ms")

    return build_report(
        cfg,
        prompts,
        samples,
        block_ms=block_ms,
        block_ms_xla=block_ms_xla,
        drafter_ms=drafter_ms,
        machine=machine_info(),
        args=dict(args) if args is not None else jsonable(dataclasses.asdict(cfg)),
        peer_info=peer.describe() if peer is not None else None,
        server_counters=counters,
        extra=extra,
    )


def jsonable(obj: Any) -> Any:
    """Paths, tuples and other values of an argparse namespace as JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def build_report(
    cfg: BenchConfig,
    prompts: Sequence[BenchPrompt],
    samples: Mapping[tuple[str, str], Sequence[Sequence[Sample]]],
    *,
    block_ms: Mapping[int, float] | None = None,
    block_ms_xla: Mapping[int, float] | None = None,
    drafter_ms: Mapping[str, float] | None = None,
    machine: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    peer_info: Mapping[str, Any] | None = None,
    server_counters: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a run from its samples (pure: no model is touched).

    Args:
        cfg: the run's config.
        prompts: the prompt set.
        samples: (via, mode) -> [i]: the repeats of prompt i.
        block_ms: k -> ms per primary forward of k tokens.
        block_ms_xla: the same with every product in XLA on float32 weights (when the int8 kernel ran; else None).
        drafter_ms: drafter name -> ms per one-token step.
        machine: `machine_info()`.
        args: the command line's arguments.
        peer_info: the peer's `describe()`.
        server_counters: the orchestrator's fallback counters over the run.
        extra: more top-level entries.

    Returns:
        A JSON-able dict:
        schema; args; config; machine; peer; prompts [{prompt, category, prompt_tokens}]; vias;
        results.<via>.<mode>: `summarize`'s figures;
        modes.<mode>: the headline figures — through gRPC when gRPC ran for the mode, else in process — plus `via`;
        in_process.<mode>: the in-process figures (when in process ran);
        speedup.<mode>: headline tokens/s over the primary's through the same via (a peer's: over the in-process
        primary); speedup_by_via.<via>.<mode>;
        identical.<mode>: every prompt's tokens equal the primary's, through every via (the reference: the primary's
        in-process outputs, else its gRPC ones); mismatches.<mode>: [{via, prompt, position}];
        consistent_across_vias.<mode>: in-process and gRPC outputs equal (when both ran);
        tax.<mode>: in-process tokens/s ÷ gRPC tokens/s (when both ran);
        block_cost.<k>: ms(k) / ms(1); block_cost_ms.<k>; block_cost_context;
        block_cost_ms_xla.<k>, block_cost_xla.<k>: the same for the primary's XLA float32 twin (or null);
        drafter_step_ms.<name>; drafter_step_ratio.<name>: ÷ the primary's k = 1;
        server_counters: drafter fallbacks and primary failovers the orchestrator counted during the run (or null).
        Keys k are strings (JSON object keys).
    """
    modes = cfg.all_modes
    results: dict[str, dict[str, Any]] = {}
    for (via, mode), per_prompt in samples.items():
        results.setdefault(via, {})[mode] = summarize(per_prompt)
    vias = [v for v in VIAS if v in results]
    results = {v: {m: results[v][m] for m in modes if m in results[v]} for v in vias}

    headline: dict[str, dict[str, Any]] = {}
    for mode in modes:
        for via in ("grpc", "in-process"):
            if mode in results.get(via, {}):
                headline[mode] = {"via": via, **results[via][mode]}
                break

    by_via = {v: speedups({m: r["tokens_per_s"] for m, r in results[v].items()}) for v in vias}
    speedup = {m: by_via[h["via"]].get(m) for m, h in headline.items()}

    ref_via = next((v for v in vias if BASELINE in results[v]), None)
    reference = results[ref_via][BASELINE]["outputs"] if ref_via else None
    identical: dict[str, bool] = {}
    diffs: dict[str, list[dict[str, Any]]] = {}
    for mode in headline:
        found = []
        for via in vias:
            if mode in results[via] and reference is not None:
                found += [{"via": via, **d} for d in mismatches(reference, results[via][mode]["outputs"])]
        identical[mode] = reference is not None and not found
        diffs[mode] = found

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "args": dict(args or {}),
        "config": jsonable(dataclasses.asdict(cfg)),
        "machine": dict(machine or {}),
        "peer": dict(peer_info) if peer_info is not None else None,
        "prompts": [{"prompt": p.text, "category": p.category, "prompt_tokens": len(p.ids)} for p in prompts],
        "vias": vias,
        "results": results,
        "modes": headline,
        "speedup": speedup,
        "speedup_by_via": by_via,
        "identical": identical,
        "mismatches": diffs,
        "tax": {},
        "block_cost": None,
        "block_cost_ms": None,
        "block_cost_xla": None,
        "block_cost_ms_xla": None,
        "block_cost_context": cfg.block_cost_context if block_ms else None,
        "drafter_step_ms": dict(drafter_ms) if drafter_ms else None,
        "drafter_step_ratio": None,
        "server_counters": dict(server_counters) if server_counters is not None else None,
    }
    if "in-process" in results:
        report["in_process"] = results["in-process"]
    if "in-process" in results and "grpc" in results:
        ip, gr = results["in-process"], results["grpc"]
        report["tax"] = microservice_tax(
            {m: r["tokens_per_s"] for m, r in ip.items()}, {m: r["tokens_per_s"] for m, r in gr.items()}
        )
        report["consistent_across_vias"] = {m: ip[m]["outputs"] == gr[m]["outputs"] for m in ip if m in gr}
    if block_ms:
        report["block_cost_ms"] = {str(k): v for k, v in sorted(block_ms.items())}
        report["block_cost"] = {str(k): v for k, v in block_cost_ratios(block_ms).items()}
        if block_ms_xla:
            report["block_cost_ms_xla"] = {str(k): v for k, v in sorted(block_ms_xla.items())}
            report["block_cost_xla"] = {str(k): v for k, v in block_cost_ratios(block_ms_xla).items()}
        if drafter_ms:
            report["drafter_step_ratio"] = {name: ms / block_ms[1] for name, ms in drafter_ms.items()}
    report.update(extra or {})
    return report


def identity_warnings(report: Mapping[str, Any]) -> list[str]:
    """One line per mode whose outputs differ from the primary's (lossless modes first; standalone Tandem noted)."""
    lines = []
    n = len(report.get("prompts", []))
    for mode, same in report.get("identical", {}).items():
        if same:
            continue
        found = report.get("mismatches", {}).get(mode, [])
        where = ", ".join(f"prompt {d['prompt'] + 1} ({d['via']}) at token {d['position']}" for d in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        prompts = len({d["prompt"] for d in found})
        if split_mode(mode)[0] in LOSSY_MODES:
            lines.append(f"note: {mode} (standalone, unverified by design) differs from primary on {prompts}/{n}")
        else:
            lines.append(f"WARNING: {mode} is NOT identical to primary on {prompts}/{n} prompts: {where}{more}")
    lines.sort(key=lambda s: not s.startswith("WARNING"))
    for key, value in (report.get("server_counters") or {}).items():
        if value:
            lines.append(f"WARNING: the orchestrator counted {value:g} {key} during the run (degraded requests)")
    return lines


# -- rendering ---------------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return "–" if x is None else f"{x * scale:{fmt}}{suffix}"


def commit_label(machine: Mapping[str, Any]) -> str:
    """The run's git commit, short, marked when the tree was dirty ("?" when unknown)."""
    commit = (machine.get("git_commit") or "")[:10] + (" (dirty)" if machine.get("git_dirty") else "")
    return commit or "?"


def machine_line(machine: Mapping[str, Any]) -> str:
    """`machine_info()` as one markdown sentence."""
    m = machine
    kernel = m.get("int8_kernel")
    products = "" if kernel is None else ", int8 kernel on" if kernel else ", int8 kernel off (XLA float32 products)"
    return (
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores usable "
        f"({m.get('cpu_count')} online), {m.get('ram_gib')} GiB RAM, Python {m.get('python')}, JAX {m.get('jax')}"
        f"{products}."
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: the main table, the microservice tax, acceptance per position, the block-cost curve
    and the drafter step, identity warnings and the machine."""
    m = report.get("machine", {})
    cfg = report.get("config", {})
    n = len(report.get("prompts", []))
    out = [
        f"Benchmark ({m.get('date', '?')}, commit {commit_label(m)}): {n} prompts × {cfg.get('max_tokens')} tokens, "
        f"greedy, batch 1, γ_max = {cfg.get('gamma_max')}, τ = {cfg.get('tau')}, "
        f"τ_first = {cfg.get('tau_first', 0)}, repeats = {cfg.get('repeats')}.",
        machine_line(m),
        "",
        "| mode | via | tok/s | speedup | TTFT median / p90 (ms) | TPOT median (ms) | accept length | accept rate "
        "| primary calls/token | drafter calls/token | identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    results = report.get("results", {})
    identical = report.get("identical", {})
    by_via = report.get("speedup_by_via", {})
    for mode in report.get("modes", {}):
        for via in VIAS:
            r = results.get(via, {}).get(mode)
            if r is None:
                continue
            ttft = f"{_f(r['ttft_s_median'], '.0f', 1000)} / {_f(r['ttft_s_p90'], '.0f', 1000)}"
            same = identical.get(mode)
            mark = "✓" if same else ("✗ (by design)" if split_mode(mode)[0] in LOSSY_MODES else "**✗**")
            out.append(
                f"| {mode} | {via} | {_f(r['tokens_per_s'])} | {_f(by_via.get(via, {}).get(mode), '.2f', suffix='×')} "
                f"| {ttft} | {_f(r['tpot_s_median'], '.1f', 1000)} | {_f(r['mean_acceptance_length'], '.2f')} "
                f"| {_f(r['acceptance_rate'], '.0%')} | {_f(r['primary_calls_per_token'], '.2f')} "
                f"| {_f(r['drafter_calls_per_token'], '.2f')} | {mark} |"
            )
    out.append("")
    out.append(
        "Speedup: tokens/s over `primary` through the same via (peer modes: over the in-process primary). "
        "tok/s: median over prompts of output tokens / end-to-end latency, measured by the client."
        + (
            " A mode named MODE@τ_first:τ:γ_max ran with those settings instead of the run's."
            if any(split_mode(m)[1] for m in report.get("modes", {}))
            else ""
        )
    )
    tax = report.get("tax") or {}
    if tax:
        out += ["", "| mode | in-process tok/s | gRPC tok/s | microservice tax |", "|---|---:|---:|---:|"]
        for mode, t in tax.items():
            ip, gr = results["in-process"][mode], results["grpc"][mode]
            out.append(f"| {mode} | {_f(ip['tokens_per_s'])} | {_f(gr['tokens_per_s'])} | {_f(t, '.2f', suffix='×')} |")
    overhead_rows = [
        (mode, via, r)
        for mode in report.get("modes", {})
        for via in VIAS
        if (r := results.get(via, {}).get(mode)) and r.get("overhead") is not None
    ]
    if overhead_rows:
        out += [
            "",
            "Orchestration overhead: the share of the client's end-to-end time spent outside the model workers' "
            "batched calls (request loop, batching hand-off and, through gRPC, serialization and transport).",
            "",
            "| mode | via | model time (s) | end-to-end (s) | overhead |",
            "|---|---|---:|---:|---:|",
        ]
        for mode, via, r in overhead_rows:
            e2el = _f(sum(p["e2el_s"] for p in r["per_prompt"]), ".2f")
            out.append(f"| {mode} | {via} | {_f(r['model_s'], '.2f')} | {e2el} | {_f(r['overhead'], '.1%')} |")
    pos_rows = [
        (mode, via, r["acceptance_per_position"])
        for mode in report.get("modes", {})
        for via in VIAS
        if (r := results.get(via, {}).get(mode)) and r.get("acceptance_per_position")
    ]
    if pos_rows:
        width = max(len(p) for _, _, p in pos_rows)
        out += [
            "",
            "Acceptance per draft position (rounds accepting draft j ÷ rounds):",
            "",
            "| mode | via | " + " | ".join(str(j + 1) for j in range(width)) + " |",
            "|---|---|" + "---:|" * width,
        ]
        for mode, via, p in pos_rows:
            cells = [_f(x, ".2f") for x in p] + [""] * (width - len(p))
            out.append(f"| {mode} | {via} | " + " | ".join(cells) + " |")
    block_ms, block = report.get("block_cost_ms"), report.get("block_cost")
    if block_ms and block:
        ks = list(block_ms)
        out += [
            "",
            f"Primary block cost: one `PrimaryRunner.forward` of k tokens after {report.get('block_cost_context')} "
            "cached tokens (median; blocks are padded to a power of two).",
            "",
            "| k | " + " | ".join(ks) + " |",
            "|---|" + "---:|" * len(ks),
            "| ms | " + " | ".join(_f(block_ms[k], ".1f") for k in ks) + " |",
            "| ÷ k=1 | " + " | ".join(_f(block[k], ".2f") for k in ks) + " |",
        ]
        xla_ms, xla = report.get("block_cost_ms_xla"), report.get("block_cost_xla")
        if xla_ms and xla:
            out += [
                "| ms, XLA float32 products | " + " | ".join(_f(xla_ms.get(k), ".1f") for k in ks) + " |",
                "| ÷ k=1 (XLA) | " + " | ".join(_f(xla.get(k), ".2f") for k in ks) + " |",
                "",
                "The first rows run the primary's products of up to 8 tokens in the int8 kernel "
                "(`tandem.model.kernels`); the XLA rows are the same weights with every product in XLA, timed in the "
                "same interleaving.",
            ]
    drafter_ms, drafter_ratio = report.get("drafter_step_ms"), report.get("drafter_step_ratio") or {}
    if drafter_ms:
        out += ["", "| drafter | ms per 1-token step | ÷ primary k=1 |", "|---|---:|---:|"]
        for name, ms in drafter_ms.items():
            out.append(f"| {name} | {_f(ms, '.2f')} | {_f(drafter_ratio.get(name), '.3f')} |")
    peer = report.get("peer")
    if peer:
        out += ["", "Peer: " + ", ".join(f"{k} = {v}" for k, v in peer.items())]
    warnings = identity_warnings(report)
    if warnings:
        out += ["", *[f"> {w}" for w in warnings]]
    return "\n".join(out) + "\n"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display).

    Raises:
        SystemExit: matplotlib is not installed (pip install '.[bench]').
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install '.[bench]'") from None
    return plt


def save_figure(plt: Any, fig: Any, tool: str, machine: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Titles a figure with the tool and the machine (`machine_info()`), writes it as a PNG and closes it."""
    fig.suptitle(f"{tool} — {machine.get('cpu', '')} ({machine.get('date', '')})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG: tokens/s per mode (in-process and gRPC bars), and the primary's block-cost curve.

    Raises:
        SystemExit: matplotlib is not installed (pip install '.[bench]').
    """
    plt = pyplot()
    results = report.get("results", {})
    modes = list(report.get("modes", {}))
    vias = [v for v in VIAS if v in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(vias))
    for j, via in enumerate(vias):
        xs = [i + (j - (len(vias) - 1) / 2) * width for i in range(len(modes))]
        ran = [(x, results[via][m]["tokens_per_s"]) for x, m in zip(xs, modes, strict=True) if m in results[via]]
        bars = ax1.bar([x for x, _ in ran], [y or 0.0 for _, y in ran], width, label=via)  # a peer runs in process only
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(range(len(modes)), modes, rotation=15, ha="right")
    ax1.set_ylim(0, 1.25 * max([ax1.get_ylim()[1], 1e-9]))  # headroom for the legend above the bars
    ax1.set_ylabel("tokens/s (median over prompts)")
    cfg = report.get("config", {})
    ax1.set_title(f"{len(report.get('prompts', []))} prompts × {cfg.get('max_tokens')} tokens, greedy, batch 1")
    ax1.legend(loc="upper left", ncols=max(1, len(vias)))
    block_ms = report.get("block_cost_ms")
    if block_ms:
        ks = [int(k) for k in block_ms]
        xla_ms = report.get("block_cost_ms_xla")
        ax2.plot(ks, [block_ms[str(k)] for k in ks], marker="o", label="as served")
        if xla_ms:
            ax2.plot(ks, [xla_ms[str(k)] for k in ks], marker="s", label="XLA float32 products")
            ax2.legend(loc="upper left")
        ax2.set_xticks(ks)
        ax2.set_xlabel("k (tokens per primary forward)")
        ax2.set_ylabel("ms per forward")
        ax2.set_title(f"primary block cost after {report.get('block_cost_context')} tokens")
        ax2.grid(alpha=0.3)
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "no block-cost curve in this report", ha="center", va="center")
    return save_figure(plt, fig, "tandem bench", report.get("machine", {}), path)


# -- the command line's path -------------------------------------------------------------------------------------


def tokenize_prompts(rows: Sequence[tuple[str, str]], tokenizer: Any) -> list[BenchPrompt]:
    """Each prompt as a user message in the chat template (as `tandem generate --chat` renders it), tokenized."""
    return [BenchPrompt(text, category, tuple(chat_prompt_ids(tokenizer, text))) for text, category in rows]


def launch_stack(
    *,
    slots: int,
    max_len: int,
    startup_timeout_s: float = 600.0,
    prefix_cache_rows: int | None = None,
    log: Callable[[str], None] = log_stderr,
) -> ServeStack:
    """A ServeStack on free ports, launched but not yet serving (see `wait_serving`); the caller stop()s it.

    Launching first lets the caller do its own start-up (load a bundle, start Ray) while the services load.
    `prefix_cache_rows` sets the Primary's `--prefix-cache-rows` (None: its default).
    """
    from tandem.serve import ServeStack

    # The bench compares the modes themselves: its orchestrator always speculates when asked (orchestrator/payoff.py).
    extra = {"orchestrator": ["--no-payoff"]}
    if prefix_cache_rows is not None:
        extra["primary"] = ["--prefix-cache-rows", str(prefix_cache_rows)]
    stack = ServeStack(port=0, slots=slots, max_len=max_len, startup_timeout_s=startup_timeout_s, extra_args=extra)
    log(f"starting primary, secondary and orchestrator (slots={slots}, max_len={max_len}); logs in {stack.log_dir}")
    stack.launch()
    return stack


def wait_serving(stack: ServeStack, log: Callable[[str], None] = log_stderr) -> str:
    """Waits until a stack from `launch_stack` serves; returns the orchestrator's address.

    Raises:
        tandem.serve.ServeError: a service exited or did not serve within the stack's startup timeout.
    """
    stack.wait_ready(on_ready=lambda name, s: log(f"{name} serving after {s:.1f}s"))
    return stack.orchestrator_address


def run_with_bundle(
    cfg: BenchConfig,
    rows: Sequence[tuple[str, str]],
    *,
    target: str | None = None,
    metrics_url: str | None = None,
    service_metrics: Sequence[str] = (),
    max_len: int = 2048,
    startup_timeout_s: float = 600.0,
    args: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = log_stderr,
) -> dict[str, Any]:
    """`tandem bench`: the bundled models in process, and (via grpc) `target` or a ServeStack started here (slots=1).

    The stack is launched before JAX is loaded here (no fork of a JAX process) and loads while the bundle does.
    `metrics_url` (the orchestrator's) and `service_metrics` (the model services') describe a given `target`; a stack
    started here brings its own.
    """
    stack = None
    if "grpc" in cfg.vias and target is None:
        stack = launch_stack(
            slots=1,
            max_len=max_len,
            startup_timeout_s=startup_timeout_s,
            prefix_cache_rows=cfg.prefix_cache_rows,
            log=log,
        )
    try:
        from tandem.decoding.bundle import BundleConfig, load_bundle

        bundle_cfg = BundleConfig(max_len=max_len, prefix_rows=cfg.prefix_cache_rows)
        bundle = load_bundle(bundle_cfg)
        log(f"loaded the bundle in process: {bundle.drafter_sources}")
        peer = load_peer(cfg.peer, bundle_cfg) if cfg.peer else None
        if stack is not None:
            target = wait_serving(stack, log)
        prompts = tokenize_prompts(rows, bundle.tokenizer)
        return run(
            cfg,
            prompts,
            engine=bundle.engine,
            target=target,
            peer=peer,
            args=args,
            extra={
                "bundle": {
                    "drafters": bundle.drafter_sources,
                    "max_len": max_len,
                    "grpc_target": target,
                    "grpc_server": None if target is None else "ServeStack(slots=1) started here" if stack else "given",
                }
            },
            metrics_url=stack.metrics_urls["orchestrator"] if stack is not None else metrics_url,
            service_metrics=[stack.metrics_urls[k] for k in ("primary", "secondary")] if stack else service_metrics,
            log=log,
        )
    finally:
        if stack is not None:
            stack.stop()


def write_outputs(
    report: Mapping[str, Any],
    *,
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    markdown: Callable[[Mapping[str, Any]], str] = render_markdown,
    plot: Callable[[Mapping[str, Any], str | os.PathLike[str]], object] = render_plot,
) -> str:
    """Writes the JSON, markdown and PNG that were asked for; returns the markdown.

    `markdown` and `plot` render the report (default: a bench report's; `tandem loadtest` passes its own).
    """
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    text = markdown(report)
    if markdown_path is not None:
        Path(markdown_path).write_text(text, encoding="utf-8")
    if plot_path is not None:
        plot(report, plot_path)
    return text
