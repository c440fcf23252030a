"""Session-holding workers around the model runners: what the Primary and Secondary services serve.

A worker owns a runner whose cache has one slot per concurrent session, maps session ids to slots, and turns the
request loop's calls (`tandem.rounds.PrimaryAPI` / `DrafterAPI`) into block passes. Calls are serialised by a lock;
batching several sessions into one pass is the batching issue's work, and the slot layout is ready for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from tandem.config import SamplingParams, SpecConfig
from tandem.errors import InvalidRequestError, PoolExhaustedError, SessionNotFoundError, SessionStateError
from tandem.primary import BlockOutput, PrimaryRunner
from tandem.rounds import Drafts, PrimaryStep
from tandem.router import MLPRouter
from tandem.secondary import DrafterRunner
from tandem.speculative import (
    MaxProbRouter,
    Router,
    SparseDist,
    keep_drafting,
    proposal,
    request_rngs,
    sample,
    sample_sparse,
    target_probs,
    verify_greedy,
    verify_sampled,
)


@dataclasses.dataclass
class _Session:
    slot: int


class _SlotPool:
    """Session id -> per-session state holding a cache slot, with idle times, for a cache of `capacity` slots."""

    def __init__(self, capacity: int) -> None:
        self._free = list(range(capacity - 1, -1, -1))
        self.sessions: dict[str, _Session] = {}
        self.last_used: dict[str, float] = {}
        self.capacity = capacity

    def open(self, session: str, make_state: Callable[[int], _Session]) -> _Session:
        """Gives a new session a free slot and the state `make_state(slot)` builds."""
        if session in self.sessions:
            raise SessionStateError(f"session {session!r} already exists")
        if not self._free:
            raise PoolExhaustedError(f"all {self.capacity} cache slots are in use; retry shortly")
        state = make_state(self._free.pop())
        self.sessions[session] = state
        self.last_used[session] = time.monotonic()
        return state

    def get(self, session: str) -> _Session:
        state = self.sessions.get(session)
        if state is None:
            raise SessionNotFoundError(f"no live session {session!r} (never opened, released or expired)")
        self.last_used[session] = time.monotonic()
        return state

    def close(self, session: str) -> bool:
        """Frees the session's slot; returns False if it was not live."""
        state = self.sessions.pop(session, None)
        if state is None:
            return False
        del self.last_used[session]
        self._free.append(state.slot)
        return True

    def idle(self, ttl_s: float) -> list[str]:
        now = time.monotonic()
        return [s for s, t in self.last_used.items() if now - t > ttl_s]

    def __len__(self) -> int:
        return len(self.sessions)


class _SessionWorker:
    """What both workers share: a slot pool, a lock serialising model calls, release and idle expiry."""

    def __init__(self, slots: int) -> None:
        self.pool = _SlotPool(slots)
        self.lock = threading.Lock()
        self.waiting = 0  # calls queued for the lock (the queue-depth gauge)
        self._count_lock = threading.Lock()

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self.waiting += delta

    @contextlib.contextmanager
    def serialised(self) -> Iterator[None]:
        """Holds the worker's lock for one model call, counting the calls that wait for it."""
        self._count(1)
        try:
            self.lock.acquire()
        finally:
            self._count(-1)
        try:
            yield
        finally:
            self.lock.release()

    def release(self, session: str) -> bool:
        """Frees the session's slot; returns False if it was not live."""
        with self.serialised():
            return self.pool.close(session)

    def expire_idle(self, ttl_s: float) -> list[str]:
        """Releases sessions idle for longer than ttl_s; returns their ids."""
        expired = self.pool.idle(ttl_s)
        for s in expired:
            self.release(s)
        return expired


def _pick(out: BlockOutput, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """The primary's own token after a block's last position: its argmax when greedy (no logits reach the host),
    else a draw from the request's distribution."""
    if sampling.greedy:
        return int(out.top[0, -1])
    return sample(target_probs(out.logits[0, -1], sampling), rng)


@dataclasses.dataclass
class _PrimarySession(_Session):
    sampling: SamplingParams
    rng: np.random.Generator


class PrimaryWorker(_SessionWorker):
    """The primary's side of requests: prefill, block verify (or standalone processing) and release."""

    def __init__(self, runner: PrimaryRunner) -> None:
        super().__init__(runner.batch)
        self.runner = runner

    @property
    def vocab_size(self) -> int:
        return self.runner.cfg.vocab_size

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise InvalidRequestError("at least one token is required")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise InvalidRequestError(f"token ids must lie in [0, {self.vocab_size})")
        return arr

    def prefill(
        self, session: str, prompt_ids: Sequence[int], sampling: SamplingParams, want_hidden: bool
    ) -> PrimaryStep:
        """Processes the prompt in one block pass and emits the first token."""
        prompt = self._check_tokens(prompt_ids)
        with self.serialised():
            state = self.pool.open(
                session, lambda slot: _PrimarySession(slot, sampling, request_rngs(sampling.seed)[0])
            )
            assert isinstance(state, _PrimarySession)
            try:
                self.runner.truncate(state.slot, 0)
                out = self.runner.forward(prompt[None], rows=[state.slot])
                self.runner.commit(state.slot, prompt.size)
            except Exception:
                self.pool.close(session)
                raise
            token = _pick(out, sampling, state.rng)
        return PrimaryStep(0, token, out.hidden[0] if want_hidden else None)

    def verify(
        self, session: str, tokens: Sequence[int], proposals: Sequence[SparseDist], verify: bool, want_hidden: bool
    ) -> PrimaryStep:
        """Scores [t_0, d_1..d_k] in one pass, keeps t_0 and the accepted drafts, emits the next token.

        Args:
            session: an open session.
            tokens: t_0 (the last emitted token) followed by the k drafts.
            proposals: q_1..q_k for sampled requests (empty for greedy ones).
            verify: False for standalone Tandem: every draft is kept and the primary adds its free token.
            want_hidden: return the committed positions' tapped states.
        """
        block = self._check_tokens(tokens)
        drafts = [int(t) for t in block[1:]]
        with self.serialised():
            state = self.pool.get(session)
            assert isinstance(state, _PrimarySession)
            sampling = state.sampling
            if verify and not sampling.greedy and len(proposals) != len(drafts):
                raise InvalidRequestError(f"{len(drafts)} drafts need as many proposals, got {len(proposals)}")
            out = self.runner.forward(block[None], rows=[state.slot])
            if not verify:
                accepted = len(drafts)
                nxt = _pick(out, sampling, state.rng)
            elif sampling.greedy:
                v = verify_greedy(drafts, out.top[0])
                accepted, nxt = v.accepted, v.next_token
            else:
                v = verify_sampled(drafts, list(proposals), target_probs(out.logits[0], sampling), state.rng)
                accepted, nxt = v.accepted, v.next_token
            self.runner.commit(state.slot, 1 + accepted)
        return PrimaryStep(accepted, nxt, out.hidden[0, : 1 + accepted] if want_hidden else None)


@dataclasses.dataclass
class _DrafterSession(_Session):
    sampling: SamplingParams
    spec: SpecConfig
    rng: np.random.Generator
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + committed tokens + pending t_0
    round_start: int = -1  # position of the last round's t_0; -1 before start
    drafts: list[int] = dataclasses.field(default_factory=list)  # the last round's drafts


class DrafterWorker(_SessionWorker):
    """The drafter's side of requests. A Tandem worker ingests the primary's states; a vanilla one reads tokens only."""

    def __init__(self, runner: DrafterRunner, router: Router | None = None) -> None:
        super().__init__(runner.batch)
        self.runner = runner
        self.router = router or MaxProbRouter()

    @property
    def tandem(self) -> bool:
        return self.runner.cfg.tandem

    def open(self, session: str, sampling: SamplingParams, spec: SpecConfig) -> LocalDrafter:
        """Reserves a slot for a request; returns the in-process handle the request loop drives."""
        with self.serialised():
            self.pool.open(session, lambda slot: _DrafterSession(slot, sampling, spec, request_rngs(sampling.seed)[1]))
        return LocalDrafter(self, session)

    def _check_hidden(self, hidden: np.ndarray | None, n: int) -> np.ndarray | None:
        cfg = self.runner.cfg
        if not cfg.tandem:
            return None
        want = (n, len(cfg.tapped_layers), cfg.primary_d_model)
        if hidden is None or hidden.shape != want:
            got = None if hidden is None else hidden.shape
            raise InvalidRequestError(f"the Tandem drafter needs primary states of shape {want}, got {got}")
        if not np.all(np.isfinite(hidden)):
            raise InvalidRequestError("primary states contain NaN or Inf")
        return hidden

    def start(
        self, session: str, prompt_ids: Sequence[int], hidden: np.ndarray | None, first_token: int, max_drafts: int
    ) -> Drafts:
        """Takes the prompt (and, Tandem, the primary's states of it) and the primary's first token; drafts."""
        vocab = self.runner.cfg.vocab_size
        if not prompt_ids or any(not 0 <= t < vocab for t in (*prompt_ids, first_token)):
            raise InvalidRequestError(f"a non-empty prompt and tokens in [0, {vocab}) are required")
        with self.serialised():
            st = self.pool.get(session)
            assert isinstance(st, _DrafterSession)
            if st.round_start >= 0:
                raise SessionStateError(f"session {session!r} has already started")
            h = self._check_hidden(hidden, len(prompt_ids))
            self.runner.truncate(st.slot, 0)
            if h is not None:
                self.runner.ingest(h[None], rows=[st.slot])
            st.tokens = [*prompt_ids, first_token]
            return self._draft(st, max_drafts)

    def advance(
        self, session: str, accepted: int, hidden: np.ndarray | None, next_token: int, max_drafts: int
    ) -> Drafts:
        """Learns the last round's verdict (and, Tandem, the primary's states of t_0, d_1..d_a); drafts again."""
        if not 0 <= next_token < self.runner.cfg.vocab_size:
            raise InvalidRequestError(f"token ids must lie in [0, {self.runner.cfg.vocab_size})")
        with self.serialised():
            st = self.pool.get(session)
            assert isinstance(st, _DrafterSession)
            if st.round_start < 0:
                raise SessionStateError(f"session {session!r} has not started")
            if not 0 <= accepted <= len(st.drafts):
                raise InvalidRequestError(f"accepted={accepted} but the last round drafted {len(st.drafts)} tokens")
            h = self._check_hidden(hidden, 1 + accepted)
            m = st.round_start
            st.tokens = [*st.tokens, *st.drafts[:accepted], next_token]
            if h is not None:  # replace the round's own keys/values with primary-derived ones for t_0, d_1..d_a
                self.runner.truncate(st.slot, m)
                self.runner.ingest(h[None], rows=[st.slot])
            else:  # keep own keys/values of the accepted positions that were fed
                self.runner.truncate(st.slot, m + 1 + accepted)
            return self._draft(st, max_drafts)

    def _draft(self, st: _DrafterSession, max_drafts: int) -> Drafts:
        """Feeds what the drafter has not seen (t_0, plus a vanilla backlog), then drafts until τ or the budget."""
        gamma = max(1, min(max_drafts, st.spec.gamma_max))
        st.round_start = len(st.tokens) - 1
        pending = st.tokens[int(self.runner.lengths[st.slot]) :]
        if st.sampling.greedy and isinstance(self.router, (MLPRouter, MaxProbRouter)):  # the whole round on device
            router = self.router.device_params if isinstance(self.router, MLPRouter) else None
            top_k = self.router.cfg.top_k if isinstance(self.router, MLPRouter) else 0
            st.drafts = self.runner.draft_greedy(pending, st.slot, gamma, st.spec.tau, router, top_k)
            return Drafts(st.drafts, [])
        logits = self.runner.step(np.asarray([pending]), rows=[st.slot])[0]
        drafts: list[int] = []
        proposals: list[SparseDist] = []
        while True:
            q = proposal(logits, st.sampling, st.spec.draft_top_k)
            drafts.append(int(q.ids[0]) if st.sampling.greedy else sample_sparse(q, st.rng))
            proposals.append(q)
            if not keep_drafting(self.router, logits, len(drafts), gamma, st.spec.tau):
                break
            logits = self.runner.step(np.asarray([[drafts[-1]]]), rows=[st.slot])[0]
        st.drafts = drafts
        return Drafts(drafts, [] if st.sampling.greedy else proposals)


class LocalDrafter:
    """A DrafterAPI for one session of an in-process DrafterWorker."""

    def __init__(self, worker: DrafterWorker, session: str) -> None:
        self.worker, self.session = worker, session

    def start(self, prompt_ids: Sequence[int], hidden: np.ndarray | None, first_token: int, max_drafts: int) -> Drafts:
        return self.worker.start(self.session, prompt_ids, hidden, first_token, max_drafts)

    def advance(self, accepted: int, hidden: np.ndarray | None, next_token: int, max_drafts: int) -> Drafts:
        return self.worker.advance(self.session, accepted, hidden, next_token, max_drafts)

    def close(self) -> None:
        self.worker.release(self.session)
