"""The in-process engine: one request at a time through the primary and a drafter, in four modes.

Modes (DESIGN.md):
    primary       the primary alone, one token per block pass.
    speed         speculative decoding with the vanilla drafter.
    tandem        standalone Tandem: drafts are kept unverified; the primary's block pass over them yields the
                  representations the drafter needs next and a free token.
    tandem-speed  speculative decoding with the Tandem drafter (default); the verify pass is exactly the pass that
                  produces the representations for the next round.

A round (speculative modes): the pending token t_0 (the primary's last emitted token) is fed to the drafter with any
tokens it has not seen, the drafter proposes d_1..d_k (τ stopping, at most γ_max), the primary scores [t_0, d_1..d_k]
in one block, accepts d_1..d_a and emits t' (correction or bonus). Both caches keep positions up to d_a; the Tandem
drafter's own keys/values for the round are replaced by ones derived from the primary's states of t_0, d_1..d_a.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Sequence

import numpy as np

from tandem.config import MODES, SamplingParams, SpecConfig
from tandem.primary import PrimaryRunner
from tandem.secondary import DrafterRunner
from tandem.speculative import (
    MaxProbRouter,
    Router,
    SparseDist,
    keep_drafting,
    make_rng,
    proposal,
    sample,
    sample_sparse,
    target_probs,
    verify_greedy,
    verify_sampled,
)


@dataclasses.dataclass
class GenerationStats:
    """Per-request speculation statistics (ANCHORS.md definitions)."""

    rounds: int = 0  # speculative rounds (verify passes after the prefill)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)  # [j]: rounds accepting draft j+1
    drafted_per_position: list[int] = dataclasses.field(default_factory=list)  # [j]: rounds drafting >= j+1 tokens
    primary_calls: int = 0
    drafter_calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / rounds: tokens emitted per verify pass, counting the primary's own token."""
        return 1.0 + self.accepted_tokens / self.rounds if self.rounds else 0.0

    def record_round(self, drafted: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        for counts, n in ((self.drafted_per_position, drafted), (self.accepted_per_position, accepted)):
            counts.extend([0] * (n - len(counts)))
            for j in range(n):
                counts[j] += 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            tokens_per_s=self.tokens_per_s,
            acceptance_rate=self.acceptance_rate,
            mean_acceptance_length=self.mean_acceptance_length,
        )
        return d


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context limit)
    stats: GenerationStats
    mode: str


class Engine:
    """Runs requests one at a time; holds one primary and up to two drafters (Tandem and vanilla), batch row 0."""

    def __init__(
        self,
        primary: PrimaryRunner,
        tandem_drafter: DrafterRunner | None = None,
        vanilla_drafter: DrafterRunner | None = None,
        *,
        router: Router | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        if tandem_drafter is not None:
            if not tandem_drafter.cfg.tandem:
                raise ValueError("tandem_drafter must be a Tandem drafter (cfg.tandem=True)")
            if tuple(primary.taps) != tandem_drafter.cfg.tapped_layers:
                raise ValueError(
                    f"primary taps {primary.taps} differ from the drafter's layers {tandem_drafter.cfg.tapped_layers}"
                )
        if vanilla_drafter is not None and vanilla_drafter.cfg.tandem:
            raise ValueError("vanilla_drafter must have cfg.tandem=False")
        for d in (tandem_drafter, vanilla_drafter):
            if d is not None and d.cfg.vocab_size != primary.cfg.vocab_size:
                raise ValueError(f"drafter vocabulary {d.cfg.vocab_size} != primary's {primary.cfg.vocab_size}")
        self.primary = primary
        self.drafters = {"tandem": tandem_drafter, "tandem-speed": tandem_drafter, "speed": vanilla_drafter}
        self.router = router or MaxProbRouter()
        self.stop_token_ids = frozenset(stop_token_ids)

    @property
    def max_len(self) -> int:
        return self.primary.max_len

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        mode: str = "tandem-speed",
        max_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        spec: SpecConfig = SpecConfig(),
    ) -> GenerationResult:
        """Runs a request to completion; see `stream` for the arguments."""
        tokens: list[int] = []
        stream = self.stream(prompt_ids, mode=mode, max_tokens=max_tokens, sampling=sampling, spec=spec)
        while True:
            try:
                tokens.extend(next(stream))
            except StopIteration as done:
                result: GenerationResult = done.value
                result.token_ids = tokens
                return result

    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        mode: str = "tandem-speed",
        max_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        spec: SpecConfig = SpecConfig(),
    ) -> Generator[list[int], None, GenerationResult]:
        """Yields the tokens each pass commits; returns the GenerationResult (without token_ids) at StopIteration.

        Args:
            prompt_ids: the prompt's token ids (non-empty).
            mode: one of MODES.
            max_tokens: most tokens to generate (>= 1).
            sampling: temperature/top-k/top-p/seed; greedy when temperature == 0.
            spec: γ_max, τ and the proposal's top-K.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if any(not 0 <= t < self.primary.cfg.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.primary.cfg.vocab_size})")
        drafter = self.drafters.get(mode)
        if mode != "primary" and drafter is None:
            raise ValueError(f"mode {mode!r} needs a drafter this engine was not given")
        # Room for the prompt, the generated tokens and one padded block (bucketed shapes pad up to 2x).
        budget = self.max_len - 2 * (spec.gamma_max + 1)
        if len(prompt_ids) >= budget:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.max_len}")
        max_tokens = min(max_tokens, budget - len(prompt_ids))

        rng = make_rng(sampling.seed)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        primary = self.primary
        primary.truncate(0, 0)
        if drafter is not None:
            drafter.truncate(0, 0)
        seq = list(prompt_ids)  # prompt + everything emitted so far
        emitted: list[int] = []

        def emit(new: list[int]) -> tuple[list[int], str | None]:
            """Cuts new tokens at a stop token or max_tokens; returns (kept tokens, finish reason or None)."""
            kept: list[int] = []
            for t in new:
                if t in self.stop_token_ids:
                    return kept, "stop"
                kept.append(t)
                if len(emitted) + len(kept) >= max_tokens:
                    return kept, "length"
            return kept, None

        # Prefill: the primary processes the prompt and emits its first token.
        out = primary.forward(np.asarray([prompt_ids]))
        primary.commit(0, len(prompt_ids))
        stats.primary_calls += 1
        first = self._pick(out.logits[0, -1], sampling, rng)
        if drafter is not None and drafter.cfg.tandem:
            drafter.ingest(out.hidden)
        kept, finish_reason = emit([first])
        stats.ttft_s = time.perf_counter() - start
        while True:
            emitted.extend(kept)
            seq.extend(kept)
            if kept:
                yield kept
            if finish_reason is not None:
                break
            pending = seq[-1]  # t_0: emitted by the primary, not yet processed by it
            if mode == "primary":
                out = primary.forward(np.asarray([[pending]]))
                primary.commit(0, 1)
                stats.primary_calls += 1
                new = [self._pick(out.logits[0, 0], sampling, rng)]
            else:
                assert drafter is not None
                new = self._round(mode, drafter, seq, sampling, spec, rng, stats, max_tokens - len(emitted))
            kept, finish_reason = emit(new)
        stats.output_tokens = len(emitted)
        stats.elapsed_s = time.perf_counter() - start
        return GenerationResult(token_ids=[], finish_reason=finish_reason, stats=stats, mode=mode)

    @staticmethod
    def _pick(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
        if sampling.greedy:
            return int(np.argmax(logits))
        return sample(target_probs(logits, sampling), rng)

    def _round(
        self,
        mode: str,
        drafter: DrafterRunner,
        seq: list[int],
        sampling: SamplingParams,
        spec: SpecConfig,
        rng: np.random.Generator,
        stats: GenerationStats,
        remaining: int,
    ) -> list[int]:
        """One draft-then-verify round; returns the tokens the primary commits after t_0 = seq[-1]."""
        primary = self.primary
        m = len(seq) - 1  # position of t_0
        gamma_max = max(1, min(spec.gamma_max, remaining - 1))  # a round emits accepted + 1 tokens

        # Draft: feed whatever the drafter has not seen (t_0, plus the vanilla drafter's backlog), then its own drafts.
        drafts: list[int] = []
        proposals: list[SparseDist] = []
        logits = drafter.step(np.asarray([seq[int(drafter.lengths[0]) :]]))[0]
        stats.drafter_calls += 1
        while True:
            q = proposal(logits, sampling, spec.draft_top_k)
            drafts.append(int(q.ids[0]) if sampling.greedy else sample_sparse(q, rng))
            proposals.append(q)
            if not keep_drafting(self.router, logits, len(drafts), gamma_max, spec.tau):
                break
            logits = drafter.step(np.asarray([[drafts[-1]]]))[0]
            stats.drafter_calls += 1

        # Verify (or, standalone, just process) t_0, d_1..d_k in one block pass.
        out = primary.forward(np.asarray([[seq[-1], *drafts]]))
        stats.primary_calls += 1
        k = len(drafts)
        if mode == "tandem":
            accepted, nxt = k, self._pick(out.logits[0, k], sampling, rng)
        elif sampling.greedy:
            accepted, nxt = (v := verify_greedy(drafts, out.logits[0])).accepted, v.next_token
        else:
            v = verify_sampled(drafts, proposals, target_probs(out.logits[0], sampling), rng)
            accepted, nxt = v.accepted, v.next_token
        stats.record_round(k, accepted)

        # Keep t_0, d_1..d_a in both caches.
        primary.commit(0, 1 + accepted)
        if drafter.cfg.tandem:
            drafter.truncate(0, m)
            drafter.ingest(out.hidden[:, : 1 + accepted])
        else:
            drafter.truncate(0, m + 1 + accepted)
        return [*drafts[:accepted], nxt]
