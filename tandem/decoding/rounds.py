"""The request loop: SPEED rounds between a primary and a drafter, independent of where they run.

The same `run_request` drives the in-process engine (workers called directly) and the orchestrator service (workers
behind gRPC stubs), so the two produce the same tokens and the microservice tax is a plain ratio. JAX-free.

Modes (docs/design.md, Method):
    primary       the primary alone, one token per block pass.
    speed         speculative decoding with the vanilla drafter.
    tandem        standalone Tandem: drafts are kept unverified; the primary's block pass over them yields the
                  representations the drafter needs next and a free token.
    tandem-speed  speculative decoding with the Tandem drafter (default); the verify pass is exactly the pass that
                  produces the representations for the next round.

A round: the drafter proposes d_1..d_k after the pending token t_0 (τ stopping, at most γ_max), the primary scores
[t_0, d_1..d_k] in one block, keeps d_1..d_a and emits t' (correction or bonus); the drafter then learns a, t' and
(Tandem) the primary's states of t_0, d_1..d_a. A drafter unsure of d_1 (τ_first) proposes nothing (k = 0): the
round is then a one-token primary step, which costs less than a verify of two tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence
from typing import Protocol

import numpy as np

from tandem.config import MODES, SPECULATIVE_MODES, SamplingParams, SpecConfig
from tandem.decoding.speculative import SparseDist
from tandem.errors import DrafterUnavailableError, InvalidRequestError, PrimaryUnavailableError

MAX_STEPS = 16  # most one-token steps one multi-step Primary call may run (other sessions' calls wait while it does)


@dataclasses.dataclass(frozen=True)
class PrimaryStep:
    """What the primary returns for a prefill or a verify pass."""

    accepted: int  # drafts kept (0 for a prefill or a primary-only step)
    next_token: int  # the primary's token after them: first token, correction, bonus or free token
    hidden: np.ndarray | None  # [n, n_taps, D] states of the positions it committed (None unless asked for)
    sessions: int = 0  # sessions open on the primary replica that ran it, from every orchestrator (0: not reported)
    prior: tuple[int, ...] = ()  # a multi-step call's tokens before next_token (each fed to the step after it)

    def __repr__(self) -> str:
        shape = None if self.hidden is None else self.hidden.shape
        return (
            f"PrimaryStep(accepted={self.accepted}, next_token={self.next_token}, hidden={shape}, "
            f"sessions={self.sessions}, prior={self.prior})"
        )


@dataclasses.dataclass(frozen=True)
class Drafts:
    """A drafter's proposal for one round."""

    tokens: list[int]  # d_1..d_k
    proposals: list[SparseDist]  # q_1..q_k (empty for greedy requests)
    looked_up: bool = False  # prompt lookup found them in the request's own tokens (no drafter model call)


class PrimaryAPI(Protocol):
    """The primary's side of a request (a worker in process, or the Primary service)."""

    def prefill(
        self, session: str, prompt_ids: Sequence[int], sampling: SamplingParams, want_hidden: bool
    ) -> PrimaryStep: ...

    def verify(
        self,
        session: str,
        tokens: Sequence[int],
        proposals: Sequence[SparseDist],
        verify: bool,
        want_hidden: bool,
        steps: int = 1,
    ) -> PrimaryStep: ...

    def release(self, session: str) -> bool: ...


class DrafterAPI(Protocol):
    """The drafter's side of a request (a worker in process, or a Secondary service stream)."""

    def start(
        self,
        prompt_ids: Sequence[int],
        hidden: np.ndarray | None,
        first_token: int,
        max_drafts: int,
    ) -> Drafts: ...

    def advance(
        self,
        accepted: int,
        hidden: np.ndarray | None,
        next_token: int,
        max_drafts: int,
        skipped: Sequence[int] = (),
    ) -> Drafts:
        """The last round's verdict, then drafts. `skipped`: the tokens fed by the primary-only steps run since that
        round (a pause, see `Pacer`), whose states follow the round's in `hidden` ([1 + accepted + len(skipped), ...]);
        next_token is then the last of those steps' token."""
        ...

    def close(self) -> None: ...


@dataclasses.dataclass
class GenerationStats:
    """Per-request speculation statistics (docs/design.md, Metric definitions)."""

    rounds: int = 0  # speculative rounds (verify passes after the prefill)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)  # [j]: rounds accepting draft j+1
    drafted_per_position: list[int] = dataclasses.field(default_factory=list)  # [j]: rounds drafting >= j+1 tokens
    primary_calls: int = 0
    drafter_calls: int = 0  # drafting requests (one per round)
    declined_rounds: int = 0  # drafting requests the router declined (τ_first): a one-token primary step each
    paused_steps: int = 0  # primary-only steps run while speculation was paused (`Pacer`), the drafter not asked
    lookup_rounds: int = 0  # of `rounds`, those whose drafts prompt lookup found (`SpecConfig.lookup_ngram`)
    lookup_drafted_tokens: int = 0  # their drafts
    lookup_accepted_tokens: int = 0  # and those kept
    drafter_failures: int = 0  # 1 when the drafter failed and the request finished with the primary alone
    primary_failovers: int = 0  # times the request moved to another primary replica (re-prefilled)
    load_shed: bool = False  # the server's load ended speculation early (primary-only rounds from then on)
    speculation_skipped: bool = False  # the server ran a speculative request primary-only: it did not pay there
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

    def record_round(self, drafted: int, accepted: int, looked_up: bool = False) -> None:
        self.rounds += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        if looked_up:
            self.lookup_rounds += 1
            self.lookup_drafted_tokens += drafted
            self.lookup_accepted_tokens += accepted
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
class Pacer:
    """Pauses a request's speculation where it does not pay (`SpecConfig.min_accepted`).

    After each round, the exponential average of the drafts its rounds kept (the latest weighing `WEIGHT`) is
    compared with min_accepted; below it, the next pause_steps steps are primary-only and the drafter is not asked
    (it hears of them with the next round's verdict). The average depends on the request's tokens only, so a request
    takes the same steps in process and through the services, and a seeded sampled request draws the same tokens.
    """

    WEIGHT = 0.25

    min_accepted: float
    pause_steps: int
    average: float | None = None
    paused: int = 0  # primary-only steps left in the current pause

    def observe(self, accepted: int) -> None:
        """Takes a round's kept drafts; starts a pause if the average falls below min_accepted."""
        self.average = accepted if self.average is None else self.average + self.WEIGHT * (accepted - self.average)
        if self.average < self.min_accepted:
            self.paused = self.pause_steps

    def pause_step(self) -> bool:
        """Whether the next step is a paused (primary-only) one; counts it."""
        if self.paused == 0:
            return False
        self.paused -= 1
        return True


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context limit)
    stats: GenerationStats
    mode: str


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, validated."""

    prompt_ids: tuple[int, ...]
    mode: str = "tandem-speed"
    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    spec: SpecConfig = SpecConfig()

    @property
    def drafter_spec(self) -> SpecConfig:
        """The settings the request's drafter session opens with: standalone Tandem keeps its drafts unverified, so
        they come from the Tandem drafter alone (no prompt lookup, whose guesses only verification makes safe)."""
        return self.spec if self.mode in SPECULATIVE_MODES else dataclasses.replace(self.spec, lookup_ngram=0)

    def validate(self, vocab_size: int, max_len: int, max_tokens_limit: int | None = None) -> int:
        """Checks the request against the model and returns the tokens it may generate within max_len.

        Raises:
            InvalidRequestError: with a message a person can act on.
        """
        if self.mode not in MODES:
            raise InvalidRequestError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not self.prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise InvalidRequestError(f"max_tokens {self.max_tokens} exceeds this server's limit {max_tokens_limit}")
        if any(not 0 <= t < vocab_size for t in self.prompt_ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size})")
        budget = max_len - (self.spec.gamma_max + 1)  # room for the last round's block
        if len(self.prompt_ids) >= budget:
            raise InvalidRequestError(
                f"prompt of {len(self.prompt_ids)} tokens leaves no room in a context of {max_len} tokens"
            )
        return min(self.max_tokens, budget - len(self.prompt_ids))


def run_request(
    req: Request,
    session: str,
    primary: PrimaryAPI,
    drafter: DrafterAPI | None,
    *,
    max_tokens: int,
    stop_token_ids: frozenset[int] = frozenset(),
    stats: GenerationStats | None = None,
    failover: Callable[[], PrimaryAPI] | None = None,
    gamma_cap: Callable[[int], int] | None = None,
    primary_steps: Callable[[int], int] | None = None,
) -> Generator[list[int], None, GenerationResult]:
    """Runs a validated request; yields the tokens each primary pass commits, returns the result (token_ids empty).

    Both sessions are released when the generator finishes, fails or is closed (client cancellation).

    Args:
        req: the request (see Request.validate).
        session: id of the request's sessions on both workers.
        primary: the primary's side.
        drafter: the drafter's side, opened for this request (None in primary mode).
        max_tokens: tokens to generate, as returned by Request.validate.
        stop_token_ids: tokens that end the request (not emitted).
        stats: filled in as the request runs (pass one to read it after closing the generator early).
        failover: when the primary raises PrimaryUnavailableError, returns the primary of another replica; the
            request re-prefills its prompt and every token emitted so far there and goes on with the primary alone
            (greedy output is unchanged). None: the error propagates.
        gamma_cap: asked before each round of a speculative mode for the most drafts the server's load allows,
            given the sessions the primary replica reported with its last step (`PrimaryStep.sessions`); 0 lets
            the drafter go and finishes the request with primary-only rounds (lossless, like a drafter failure).
            None: γ is the request's own.
        primary_steps: asked before each primary-only call once the request has no drafter (primary mode, shed by
            the load, or after a drafter failure), given the replica's reported sessions: how many one-token steps
            one call may run (multi-step decoding: the same tokens, fewer round trips). None: one.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(req.prompt_ids)
    start = time.perf_counter()
    emitted: list[int] = []
    want_hidden = drafter is not None and req.mode in ("tandem", "tandem-speed")  # the Tandem drafter reads them
    pacer = None
    if req.spec.min_accepted > 0 and req.mode in SPECULATIVE_MODES:
        pacer = Pacer(req.spec.min_accepted, req.spec.pause_steps)
    held: PrimaryStep | None = None  # during a pause: the verdict of the round before it
    skipped: list[int] = []  # during a pause: the tokens its primary-only steps fed
    skipped_hidden: list[np.ndarray] = []  # and their states (Tandem)

    def emit(new: list[int]) -> tuple[list[int], str | None]:
        """Cuts new tokens at a stop token or max_tokens; returns (kept tokens, finish reason or None)."""
        kept: list[int] = []
        for t in new:
            if t in stop_token_ids:
                return kept, "stop"
            kept.append(t)
            if len(emitted) + len(kept) >= max_tokens:
                return kept, "length"
        return kept, None

    def round_budget(cap: int) -> int:
        return max(1, min(req.spec.gamma_max, cap, max_tokens - len(emitted) - 1))  # a round emits accepted + 1

    def prefill_somewhere(ids: tuple[int, ...], hidden: bool) -> PrimaryStep:
        """Prefills on the current primary, moving to another replica (failover) while the current one is lost."""
        nonlocal primary
        while True:
            try:
                return primary.prefill(session, ids, req.sampling, hidden)
            except PrimaryUnavailableError:
                if failover is None:
                    raise
                primary = failover()  # raises once no replica is left
                stats.primary_failovers += 1

    try:
        step = prefill_somewhere(req.prompt_ids, want_hidden)
        stats.primary_calls += 1
        stats.ttft_s = time.perf_counter() - start
        kept, finish = emit([step.next_token])
        drafts: Drafts | None = None
        while True:
            emitted.extend(kept)
            if kept:
                yield kept
            if finish is not None:
                break
            pending = step.next_token
            cap = req.spec.gamma_max
            if drafter is not None and gamma_cap is not None and req.mode != "tandem":
                cap = gamma_cap(step.sessions)  # asked only while speculating: primary-only rounds never consult it
            if drafter is not None and cap == 0:  # the primary is too busy for speculation to pay: let it go
                stats.load_shed = True
                drafter.close()
                drafter = None
            paused = drafter is not None and pacer is not None and pacer.pause_step()
            if drafter is not None and not paused:
                try:
                    if drafts is None:
                        drafts = drafter.start(req.prompt_ids, step.hidden, pending, round_budget(cap))
                    elif held is None:
                        drafts = drafter.advance(step.accepted, step.hidden, pending, round_budget(cap))
                    else:  # the first round after a pause: the verdict before it, then what the pause fed
                        hidden = None if held.hidden is None else np.concatenate([held.hidden, *skipped_hidden])
                        drafts = drafter.advance(held.accepted, hidden, pending, round_budget(cap), skipped)
                        held, skipped, skipped_hidden = None, [], []
                except DrafterUnavailableError:
                    # Lossless degradation: the primary's cache holds every committed token, so primary-only steps
                    # continue from `pending` exactly as an undisturbed run would have.
                    stats.drafter_failures += 1
                    drafter.close()
                    drafter = None
            try:
                if drafter is None or drafts is None or paused:  # primary mode, the drafter failed, or a pause
                    if paused:
                        held = step if held is None else held
                        skipped.append(pending)
                        stats.paused_steps += 1
                    steps = 1
                    if drafter is None and primary_steps is not None:  # primary-only for good: multi-step calls
                        steps = max(1, min(primary_steps(step.sessions), max_tokens - len(emitted)))
                    step = primary.verify(session, [pending], [], True, paused and want_hidden, steps)
                    stats.primary_calls += 1
                    if paused and step.hidden is not None:
                        skipped_hidden.append(step.hidden)
                    kept, finish = emit([*step.prior, step.next_token])
                    continue
                stats.drafter_calls += 1
                step = primary.verify(
                    session, [pending, *drafts.tokens], drafts.proposals, req.mode != "tandem", want_hidden
                )
                stats.primary_calls += 1
                if drafts.tokens:
                    stats.record_round(len(drafts.tokens), step.accepted, drafts.looked_up)
                    if pacer is not None:
                        pacer.observe(step.accepted)
                else:
                    stats.declined_rounds += 1
                kept, finish = emit([*drafts.tokens[: step.accepted], step.next_token])
            except PrimaryUnavailableError:
                if failover is None:
                    raise
                # The replica and its cache are gone; this process holds every token so far. Prefilling them on
                # another replica yields the token after `pending`, exactly what a primary-only step would have.
                primary = failover()
                stats.primary_failovers += 1
                if drafter is not None:  # its caches follow the lost replica's positions: finish without it
                    drafter.close()
                    drafter = None
                step = prefill_somewhere((*req.prompt_ids, *emitted), False)
                stats.primary_calls += 1
                kept, finish = emit([step.next_token])
    finally:
        stats.output_tokens = len(emitted)
        stats.elapsed_s = time.perf_counter() - start
        primary.release(session)
        if drafter is not None:
            drafter.close()
    return GenerationResult(token_ids=[], finish_reason=finish, stats=stats, mode=req.mode)
