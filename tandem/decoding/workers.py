"""Session-holding workers around the model runners: what the Primary service (the primary) and the Secondary
service (the drafters) serve.

A worker owns a runner whose cache has one slot per concurrent session, maps session ids to slots, and turns the
request loop's calls (`rounds.PrimaryAPI` / `DrafterAPI`) into block passes. Calls from different sessions that arrive
while the model is busy (or within a short batching window) run together as one batched call: continuous batching,
with every session's rows at their own lengths and positions (see `_Batcher`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

import numpy as np

from tandem.config import BatchingConfig, SamplingParams, SpecConfig
from tandem.decoding.lookup import LookupConfig, lookup_drafts
from tandem.decoding.rounds import MAX_STEPS, Drafts, PrimaryStep
from tandem.decoding.speculative import (
    MaxProbRouter,
    Router,
    SparseDist,
    keep_drafting,
    proposal,
    request_rngs,
    sample,
    sample_sparse,
    speculates,
    target_probs,
    verify_greedy,
    verify_sampled,
)
from tandem.errors import (
    ContextFullError,
    InvalidRequestError,
    PoolExhaustedError,
    SessionNotFoundError,
    SessionStateError,
)
from tandem.model.drafter import DrafterRunner, stack_states
from tandem.model.kvcache import PrefixCache, bucket, buckets, rows_per_call
from tandem.model.primary import BlockOutput, PrimaryRunner
from tandem.model.router import MLPRouter

_T = TypeVar("_T")


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


@dataclasses.dataclass(eq=False)
class _Call:
    """One session's model call waiting for a batch; the worker's batch function sets result or error."""

    session: str
    result: object = None
    error: BaseException | None = None
    done: bool = False


class _Batcher:
    """Continuous batching by flat combining: the caller that finds the model idle takes every queued call (up to
    max_batch, one per session), runs them as one batch for everyone, and hands back the results; the others wait.

    Calls that arrive while a batch runs make up the next one. An idle model waits up to `window_s` for the calls of
    the live sessions (`live()`) that are due within it (see `_gather`); a lone session never waits. It owns no
    thread, so an in-process engine and a service share it.
    """

    def __init__(
        self, run: Callable[[list[_Call]], None], cfg: BatchingConfig, live: Callable[[], Collection[str]]
    ) -> None:
        if cfg.max_batch < 1 or cfg.window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and window_s >= 0, got {cfg}")
        self._run, self.cfg, self._live = run, cfg, live
        self._done: dict[str, float] = {}  # session -> when its last call here finished (time.monotonic)
        self._turnaround: dict[str, float] = {}  # session -> average time from a finished call to its next call
        self._cv = threading.Condition()
        self._queue: list[_Call] = []
        self._busy = False
        self.batches = 0  # batched model rounds run so far
        self.calls = 0  # calls they served (calls / batches = the mean batch size)
        self.busy_s = 0.0  # seconds spent running batches (what is not model time is the callers' overhead)

    @property
    def waiting(self) -> int:
        """Calls queued for the model (the queue-depth gauge)."""
        return len(self._queue)

    def submit(self, call: _Call) -> object:
        """Queues a call and returns its result once a batch has run it (raising its error, if any)."""
        with self._cv:
            done = self._done.get(call.session)
            if done is not None:
                gap, last = time.monotonic() - done, self._turnaround.get(call.session)
                self._turnaround[call.session] = gap if last is None else 0.5 * (last + gap)
            self._queue.append(call)
            self._cv.notify_all()
            while not call.done:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                batch: list[_Call] = []
                started: float | None = None
                try:
                    self._gather()
                    batch = self._take()
                    started = time.monotonic()
                    self._cv.release()
                    try:
                        self._run_all(batch)
                    finally:
                        self._cv.acquire()
                finally:
                    finished = time.monotonic()
                    if started is not None:
                        self.busy_s += finished - started
                    for c in batch:
                        c.done = True
                        self._done[c.session] = finished
                    self.batches += 1
                    self.calls += len(batch)
                    self._busy = False
                    self._cv.notify_all()
        if call.error is not None:
            raise call.error
        return call.result

    def _gather(self) -> None:
        """The batching window (called holding the condition): wait, up to window_s, for the calls of the live
        sessions that are due within it, i.e. whose last call here finished less than their turnaround (how long their
        calls take to come back, on average) before the window ends. A session gives up its claim once it is overdue by
        a whole turnaround. So a session busy elsewhere for longer (at the other model service, or with its client)
        does not hold the batch, and neither does a session seen once."""
        deadline = time.monotonic() + self.cfg.window_s
        live = set(self._live())
        for gone in [s for s in self._done if s not in live]:
            del self._done[gone]
            self._turnaround.pop(gone, None)
        due = {s: self._done[s] + 2 * t for s, t in self._turnaround.items() if self._done[s] + t <= deadline}
        while len(self._queue) < self.cfg.max_batch:
            now, queued = time.monotonic(), {c.session for c in self._queue}
            give_up = [by for s, by in due.items() if s not in queued and by > now]
            if not give_up:
                return
            self._cv.wait(min(deadline, max(give_up)) - now)
            if time.monotonic() >= deadline:
                return

    def _take(self) -> list[_Call]:
        """Oldest first, one call per session (a second call of a session waits for the next batch)."""
        batch: list[_Call] = []
        sessions: set[str] = set()
        for c in self._queue:
            if len(batch) == self.cfg.max_batch:
                break
            if c.session not in sessions:
                batch.append(c)
                sessions.add(c.session)
        taken = {id(c) for c in batch}
        self._queue = [c for c in self._queue if id(c) not in taken]
        return batch

    def _run_all(self, batch: list[_Call]) -> None:
        try:
            self._run(batch)
        except BaseException as e:  # the batch function failed as a whole: every call without an answer gets the error
            for c in batch:
                if c.result is None and c.error is None:
                    c.error = e
            if not isinstance(e, Exception):
                raise


class _SessionWorker:
    """What both workers share: a slot pool, the batcher that runs model calls, release and idle expiry."""

    def __init__(self, slots: int, batching: BatchingConfig) -> None:
        self.pool = _SlotPool(slots)
        self.pool_lock = threading.Lock()  # pool changes; held while a batch looks its sessions up
        self.batcher = _Batcher(self._run_batch, batching, live=lambda: self.pool.sessions.keys())

    @property
    def waiting(self) -> int:
        """Calls queued for the model (the queue-depth gauge)."""
        return self.batcher.waiting

    @property
    def busy_s(self) -> float:
        """Seconds this worker has spent running batched model calls (monotonic)."""
        return self.batcher.busy_s

    def _run_batch(self, calls: list[_Call]) -> None:
        raise NotImplementedError

    def release(self, session: str) -> bool:
        """Frees the session's slot; returns False if it was not live."""
        with self.pool_lock:
            return self.pool.close(session)

    def expire_idle(self, ttl_s: float) -> list[str]:
        """Releases sessions idle for longer than ttl_s; returns their ids."""
        with self.pool_lock:
            expired = self.pool.idle(ttl_s)
        for s in expired:
            self.release(s)
        return expired


def _groups(items: list[_T], size: Callable[[_T], int]) -> list[list[_T]]:
    """Items grouped by the block bucket of size(item), so short blocks do not pad up to long ones, each group split
    into calls of at most `rows_per_call` rows."""
    groups: dict[int, list[_T]] = {}
    for item in items:
        groups.setdefault(bucket(size(item)), []).append(item)
    return [g[i : i + rows_per_call(t)] for t, g in groups.items() for i in range(0, len(g), rows_per_call(t))]


def _token_ids(tokens: Sequence[int], vocab_size: int) -> np.ndarray:
    """tokens as an int64 array [T], checked: at least one, each in [0, vocab_size) (else InvalidRequestError)."""
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidRequestError("at least one token is required")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise InvalidRequestError(f"token ids must lie in [0, {vocab_size})")
    return arr


def _pick(out: BlockOutput, row: int, pos: int, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """The primary's own token after position `pos` of a block row: its argmax when greedy (no logits reach the
    host), else a draw from the request's distribution."""
    if sampling.greedy:
        return int(out.top[row, pos])
    return sample(target_probs(out.logits[row, pos], sampling), rng)


@dataclasses.dataclass
class _PrimarySession(_Session):
    sampling: SamplingParams
    rng: np.random.Generator


@dataclasses.dataclass(eq=False)
class _Prefill(_Call):
    prompt: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    sampling: SamplingParams = SamplingParams()
    want_hidden: bool = False
    reused: np.ndarray | None = None  # [m, n_taps, D] states of the first m positions, from the prefix cache


@dataclasses.dataclass(eq=False)
class _Verify(_Call):
    block: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # [t_0, d_1..d_k]
    proposals: Sequence[SparseDist] = ()
    verify: bool = True
    want_hidden: bool = False
    steps: int = 1  # multi-step decoding: one-token steps this call runs (block [t_0] only)


class PrimaryWorker(_SessionWorker):
    """The primary's side of requests: prefill, block verify (or standalone processing) and release. Concurrent calls
    of different sessions run as one block pass over their rows."""

    def __init__(
        self, runner: PrimaryRunner, batching: BatchingConfig = BatchingConfig(), prefix_rows: int = 4
    ) -> None:
        """
        Args:
            runner: the primary and its cache (one slot per session).
            batching: max batch and batching window.
            prefix_rows: prompts whose first positions are kept for later prompts that start the same way
                (`tandem.model.kvcache.PrefixCache`); 0 turns prefix caching off.
        """
        super().__init__(runner.batch, batching)
        self.runner = runner
        states = (len(runner.taps), runner.cfg.d_model)
        self.prefixes = PrefixCache(runner.cache, prefix_rows, states) if prefix_rows else None

    @property
    def vocab_size(self) -> int:
        return self.runner.cfg.vocab_size

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def prefill(
        self, session: str, prompt_ids: Sequence[int], sampling: SamplingParams, want_hidden: bool
    ) -> PrimaryStep:
        """Opens the session, processes the prompt in one block pass and emits the first token."""
        prompt = _token_ids(prompt_ids, self.vocab_size)
        call = _Prefill(session, prompt=prompt, sampling=sampling, want_hidden=want_hidden)
        return self.batcher.submit(call)  # type: ignore[return-value]

    def verify(
        self,
        session: str,
        tokens: Sequence[int],
        proposals: Sequence[SparseDist],
        verify: bool,
        want_hidden: bool,
        steps: int = 1,
    ) -> PrimaryStep:
        """Scores [t_0, d_1..d_k] in one pass, keeps t_0 and the accepted drafts, emits the next token.

        Args:
            session: an open session.
            tokens: t_0 (the last emitted token) followed by the k drafts.
            proposals: q_1..q_k for sampled requests (empty for greedy ones).
            verify: False for standalone Tandem: every draft is kept and the primary adds its free token.
            want_hidden: return the committed positions' tapped states.
            steps: multi-step decoding (tokens = [t_0] only, no states): up to MAX_STEPS one-token steps, each fed
                the token of the one before, as one call; the result's `prior` holds all but the last step's token.
                Exactly the tokens (and, sampled, the draws) of as many one-step calls.
        """
        block = _token_ids(tokens, self.vocab_size)
        if not 0 <= steps <= MAX_STEPS or (steps > 1 and (block.size != 1 or want_hidden or not verify)):
            raise InvalidRequestError(
                f"steps must lie in [0, {MAX_STEPS}], and more than one step takes one token and no drafts or states"
            )
        steps = max(1, steps)  # 0 (the proto's default) = one
        call = _Verify(
            session, block=block, proposals=list(proposals), verify=verify, want_hidden=want_hidden, steps=steps
        )
        return self.batcher.submit(call)  # type: ignore[return-value]

    def _run_batch(self, calls: list[_Call]) -> None:
        rows: list[tuple[_Call, _PrimarySession, np.ndarray]] = []
        with self.pool_lock:
            for c in calls:
                try:
                    rows.append(self._prepare(c))
                except Exception as e:
                    c.error = e
            sessions = len(self.pool)  # this replica's load, reported with every step (load-aware speculation)
        for group in _groups(rows, lambda r: r[2].size):
            self._forward(group, sessions)

    def _prepare(self, c: _Call) -> tuple[_Call, _PrimarySession, np.ndarray]:
        """Looks the call's session up (a prefill opens it) and checks its block fits: (call, session, block)."""
        if isinstance(c, _Prefill):
            if c.prompt.size > self.max_len:
                raise ContextFullError(f"context full: a {c.prompt.size}-token prompt exceeds max_len {self.max_len}")
            state = self.pool.open(
                c.session, lambda slot: _PrimarySession(slot, c.sampling, request_rngs(c.sampling.seed)[0])
            )
            self.runner.truncate(state.slot, 0)
            assert isinstance(state, _PrimarySession)
            if self.prefixes is None:
                return c, state, c.prompt
            row, m = self.prefixes.match(c.prompt)
            if m:
                c.reused = self.prefixes.load(self.runner.cache, row, state.slot, m)
            return c, state, c.prompt[m:]
        assert isinstance(c, _Verify)
        state = self.pool.get(c.session)
        assert isinstance(state, _PrimarySession)
        drafts = c.block.size - 1
        if c.verify and not state.sampling.greedy and len(c.proposals) != drafts:
            raise InvalidRequestError(f"{drafts} drafts need as many proposals, got {len(c.proposals)}")
        cached, new = int(self.runner.lengths[state.slot]), max(c.block.size, c.steps)  # a step commits one each
        if cached + new > self.max_len:
            raise ContextFullError(f"context full: {cached} cached + {new} new tokens exceed max_len {self.max_len}")
        return c, state, c.block

    def _forward(self, group: list[tuple[_Call, _PrimarySession, np.ndarray]], sessions: int) -> None:
        """One block pass over the group's rows, then each call's verdict (reporting `sessions` open)."""
        sizes = [block.size for _, _, block in group]
        tokens = np.zeros((len(group), max(sizes)), np.int32)
        for b, (_, _, block) in enumerate(group):
            tokens[b, : block.size] = block
        try:
            out = self.runner.forward(tokens, rows=[st.slot for _, st, _ in group], sizes=sizes)
        except Exception as e:
            for c, _, _ in group:
                c.error = e
                if isinstance(c, _Prefill):
                    self.release(c.session)
            return
        for b, (c, st, block) in enumerate(group):
            try:
                c.result = dataclasses.replace(self._finish(c, st, block, out, b), sessions=sessions)
            except Exception as e:
                c.error = e
        self._more_steps([(c, st) for c, st, _ in group if isinstance(c, _Verify) and c.steps > 1 and c.error is None])

    def _more_steps(self, calls: list[tuple[_Verify, _PrimarySession]]) -> None:
        """The further steps of multi-step calls (their first ran with the group): one-token block passes over the
        rows that have steps left, each row fed its last token, until every call has run its steps."""
        latest: list[PrimaryStep] = []  # each call's result so far
        for c, _ in calls:
            assert isinstance(c.result, PrimaryStep)
            latest.append(c.result)
        while live := [i for i, (c, _) in enumerate(calls) if c.error is None and len(latest[i].prior) + 1 < c.steps]:
            tokens = np.array([[latest[i].next_token] for i in live], np.int32)  # [B, 1]
            try:
                out = self.runner.forward(tokens, rows=[calls[i][1].slot for i in live])
            except Exception as e:
                for i in live:
                    calls[i][0].error = e
                return
            for b, i in enumerate(live):
                c, st = calls[i]
                try:
                    step = self._finish(c, st, tokens[b], out, b)  # what a one-step call of this token returns
                except Exception as e:
                    c.error = e
                    continue
                prior = (*latest[i].prior, latest[i].next_token)
                latest[i] = c.result = dataclasses.replace(step, sessions=latest[i].sessions, prior=prior)

    def _finish(self, c: _Call, st: _PrimarySession, block: np.ndarray, out: BlockOutput, b: int) -> PrimaryStep:
        """Row b of a block pass -> the call's step; commits what the session keeps."""
        if isinstance(c, _Prefill):
            self.runner.commit(st.slot, block.size)
            token = _pick(out, b, block.size - 1, st.sampling, st.rng)
            if not c.want_hidden and self.prefixes is None:
                return PrimaryStep(0, token, None)
            states = out.hidden[b, : block.size]  # [n - m, n_taps, D]
            if c.reused is not None:
                states = np.concatenate([c.reused, states])  # [n, n_taps, D]
            if self.prefixes is not None:
                self.prefixes.save(self.runner.cache, st.slot, c.prompt, states)
            return PrimaryStep(0, token, states if c.want_hidden else None)
        assert isinstance(c, _Verify)
        drafts = [int(t) for t in block[1:]]
        if not c.verify:
            accepted, nxt = len(drafts), _pick(out, b, len(drafts), st.sampling, st.rng)
        elif st.sampling.greedy:
            v = verify_greedy(drafts, out.top[b, : block.size])
            accepted, nxt = v.accepted, v.next_token
        else:
            probs = target_probs(out.logits[b, : block.size], st.sampling)
            v = verify_sampled(drafts, list(c.proposals), probs, st.rng)
            accepted, nxt = v.accepted, v.next_token
        self.runner.commit(st.slot, 1 + accepted)
        return PrimaryStep(accepted, nxt, out.hidden[b, : 1 + accepted] if c.want_hidden else None)


def _point_mass(token: int) -> SparseDist:
    """A deterministic draft's proposal: q = one-hot on it."""
    return SparseDist(ids=np.array([token], np.int64), probs=np.ones(1))


@dataclasses.dataclass
class _DrafterSession(_Session):
    sampling: SamplingParams
    spec: SpecConfig
    rng: np.random.Generator
    lookup: LookupConfig  # prompt lookup (`SpecConfig.lookup_ngram`)
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + committed tokens + pending t_0
    round_start: int = -1  # position of the last round's t_0; -1 before start
    drafts: list[int] = dataclasses.field(default_factory=list)  # the last round's drafts
    # A feature-level drafter's inputs still to come: the primary's states of positions feat_start.. (through the
    # newest position the primary has processed), [n, n_taps, P].
    feats: np.ndarray | None = None
    feat_start: int = 0


@dataclasses.dataclass(eq=False)
class _Round(_Call):
    """A drafting round: `start` (accepted is None: the prompt, its states and the first token) or `advance`."""

    tokens: list[int] = dataclasses.field(default_factory=list)  # start: the prompt; advance: the skipped tokens
    accepted: int | None = None
    hidden: np.ndarray | None = None
    next_token: int = 0
    max_drafts: int = 1


class DrafterWorker(_SessionWorker):
    """The drafter's side of requests. A Tandem worker ingests the primary's states; a vanilla one reads tokens only.
    Concurrent rounds of different sessions ingest together and, greedy ones, draft together step by step."""

    def __init__(
        self, runner: DrafterRunner, router: Router | None = None, batching: BatchingConfig = BatchingConfig()
    ) -> None:
        super().__init__(runner.batch, batching)
        self.runner = runner
        self.router = router or MaxProbRouter()
        self.lookup_rounds = 0  # rounds whose drafts came from prompt lookup, not the model (monotonic)
        self.lookup_drafts = 0  # the drafts those rounds proposed

    @property
    def tandem(self) -> bool:
        return self.runner.cfg.tandem

    def open(self, session: str, sampling: SamplingParams, spec: SpecConfig) -> LocalDrafter:
        """Reserves a slot for a request; returns the in-process handle the request loop drives."""
        lookup = LookupConfig.shortest(spec.lookup_ngram)

        def session_state(slot: int) -> _DrafterSession:
            return _DrafterSession(slot, sampling, spec, request_rngs(sampling.seed)[1], lookup)

        with self.pool_lock:
            self.pool.open(session, session_state)
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
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        _token_ids([*prompt_ids, first_token], self.runner.cfg.vocab_size)
        call = _Round(session, tokens=list(prompt_ids), hidden=hidden, next_token=first_token, max_drafts=max_drafts)
        return self.batcher.submit(call)  # type: ignore[return-value]

    def advance(
        self,
        session: str,
        accepted: int,
        hidden: np.ndarray | None,
        next_token: int,
        max_drafts: int,
        skipped: Sequence[int] = (),
    ) -> Drafts:
        """Learns the last round's verdict (and, Tandem, the primary's states of t_0, d_1..d_a), then the tokens of
        the primary-only steps since (`skipped`, their states after the round's); drafts again."""
        _token_ids([*skipped, next_token], self.runner.cfg.vocab_size)
        call = _Round(
            session,
            tokens=list(skipped),
            accepted=accepted,
            hidden=hidden,
            next_token=next_token,
            max_drafts=max_drafts,
        )
        return self.batcher.submit(call)  # type: ignore[return-value]

    def _run_batch(self, calls: list[_Call]) -> None:
        rounds: list[tuple[_Round, _DrafterSession, np.ndarray | None]] = []
        with self.pool_lock:
            for c in calls:
                assert isinstance(c, _Round)
                try:
                    rounds.append(self._prepare(c))
                except Exception as e:
                    c.error = e
        rounds = self._look_up(rounds)
        device = self._device_router is not False
        on_device: list[tuple[_Round, _DrafterSession, np.ndarray | None]] = []
        on_host: list[tuple[_Round, _DrafterSession, np.ndarray | None]] = []
        to_ingest: list[tuple[_Round, _DrafterSession, np.ndarray]] = []
        for c, st, h in rounds:
            if st.sampling.greedy and device:
                on_device.append((c, st, h))  # its primary states are written (or read) in the drafting call
            elif h is None or self.runner.cfg.features:  # a feature-level drafter's states are its step's inputs
                on_host.append((c, st, h))
            else:
                to_ingest.append((c, st, h))
        for group in _groups(to_ingest, lambda r: r[2].shape[0]):
            on_host += [(c, st, None) for c, st in self._ingest(group)]
        for drafting in _groups(on_device, lambda r: len(self._pending(r[1], r[2]))):
            self._draft_on_device(drafting)
        for c, st, h in on_host:
            try:
                c.result = self._draft_on_host(st, c.max_drafts, h)
            except Exception as e:
                c.error = e

    def _prepare(self, c: _Round) -> tuple[_Round, _DrafterSession, np.ndarray | None]:
        """Checks the call against its session's state and records the verdict: (call, session, states to ingest).

        A Tandem round replaces the drafter's own keys/values from the round's t_0 on with the primary's; a vanilla
        one keeps its own for the accepted positions it fed.
        """
        st = self.pool.get(c.session)
        assert isinstance(st, _DrafterSession)
        if c.accepted is None:
            if st.round_start >= 0:
                raise SessionStateError(f"session {c.session!r} has already started")
            h = self._check_hidden(c.hidden, len(c.tokens))
            self.runner.truncate(st.slot, 0)
            st.tokens = [*c.tokens, c.next_token]
            if self.runner.cfg.features:
                assert h is not None
                st.feats, st.feat_start = h, 0
                return c, st, self._features(st)
            return c, st, h
        if st.round_start < 0:
            raise SessionStateError(f"session {c.session!r} has not started")
        if not 0 <= c.accepted <= len(st.drafts):
            raise InvalidRequestError(f"accepted={c.accepted} but the last round drafted {len(st.drafts)} tokens")
        h = self._check_hidden(c.hidden, 1 + c.accepted + len(c.tokens))
        m = st.round_start
        st.tokens = [*st.tokens, *st.drafts[: c.accepted], *c.tokens, c.next_token]
        if self.runner.cfg.features:
            # t_0 (position m) read the primary's states when fed; every later position read the drafter's own
            # outputs and is fed again with the primary's states of the positions before it
            assert h is not None and st.feats is not None
            self.runner.truncate(st.slot, min(int(self.runner.lengths[st.slot]), m + 1))
            st.feats = np.concatenate([st.feats[: m - st.feat_start], h])
            return c, st, self._features(st)
        self.runner.truncate(st.slot, m if h is not None else m + 1 + c.accepted)
        return c, st, h

    def _features(self, st: _DrafterSession) -> np.ndarray:
        """A feature-level drafter's inputs for the session's pending tokens: at each, the primary's states of the
        position before it (zeros before position 0), [n_pending, n_taps, P]. Forgets older states."""
        assert st.feats is not None
        first = int(self.runner.lengths[st.slot]) - 1  # the position the first pending token reads
        rows = st.feats[max(first, 0) - st.feat_start :]
        if first < 0:
            rows = np.concatenate([np.zeros_like(st.feats[:1]), rows])
        st.feats, st.feat_start = st.feats[max(first, 0) - st.feat_start :], max(first, 0)
        return rows

    def _ingest(self, group: list[tuple[_Round, _DrafterSession, np.ndarray]]) -> list[tuple[_Round, _DrafterSession]]:
        """Writes the group's primary states into their rows in one call; returns the rounds that can draft."""
        sizes = [h.shape[0] for _, _, h in group]
        states = stack_states([h for _, _, h in group], len(group), max(sizes), group[0][2].shape[1:])
        try:
            self.runner.ingest(states, rows=[st.slot for _, st, _ in group], sizes=sizes)
        except Exception as e:
            for c, _, _ in group:
                c.error = e
            return []
        return [(c, st) for c, st, _ in group]

    def _look_up(
        self, rounds: list[tuple[_Round, _DrafterSession, np.ndarray | None]]
    ) -> list[tuple[_Round, _DrafterSession, np.ndarray | None]]:
        """Answers the rounds whose drafts prompt lookup finds in the request's own tokens; returns the others.

        A looked-up round calls no model: a vanilla drafter feeds nothing (the next model round feeds the backlog from
        its cache length on, `_pending`), nor does a feature-level one (its session keeps the states, `_features`); a
        layer-map Tandem one writes the round's primary states now, in a call of their own, so that its cache holds
        every position before this round's t_0 when the next round truncates to it. A sampled
        round's proposals are point masses on the drafts (q = one-hot): verification accepts d with probability p(d)
        and otherwise draws from p without d, which keeps the output distributed as the primary's.
        """
        rest: list[tuple[_Round, _DrafterSession, np.ndarray | None]] = []
        served: list[tuple[_Round, _DrafterSession, np.ndarray | None, list[int]]] = []
        for c, st, h in rounds:
            drafts = lookup_drafts(st.tokens, self._gamma(st, c.max_drafts), st.lookup) if st.lookup.enabled else []
            if drafts:
                served.append((c, st, h, drafts))
            else:
                rest.append((c, st, h))
        if not served:
            return rest
        # a feature-level drafter's states are inputs, kept with the session until a model round feeds them
        writes = [(c, st, h) for c, st, h, _ in served if h is not None and not self.runner.cfg.features]
        written = {id(c) for group in _groups(writes, lambda r: r[2].shape[0]) for c, _ in self._ingest(group)}
        for c, st, h, drafts in served:
            if h is not None and not self.runner.cfg.features and id(c) not in written:
                continue  # the ingest failed: `_ingest` gave the call its error
            st.round_start = len(st.tokens) - 1
            st.drafts = drafts
            c.result = Drafts(drafts, [] if st.sampling.greedy else [_point_mass(d) for d in drafts], looked_up=True)
            self.lookup_rounds += 1
            self.lookup_drafts += len(drafts)
        return rest

    def serving_shapes(self) -> list[tuple[str, int, int]]:
        """A Tandem worker's greedy serving shapes (`DrafterRunner.serving_shapes`), to compile ahead."""
        return self.runner.serving_shapes(buckets(min(self.runner.batch, self.batcher.cfg.max_batch)))

    def compile_shape(self, shape: tuple[str, int, int], run_upto: int = 0) -> None:
        """Compiles one of `serving_shapes` with the router the greedy rounds use (`DrafterRunner.compile_shape`)."""
        router = None if self._device_router is False else self._device_router
        self.runner.compile_shape(shape, router, self._top_k, run_upto)  # type: ignore[arg-type]

    def compile(self) -> int:
        """Compiles a Tandem worker's greedy batches ahead; returns how many shapes."""
        shapes = self.serving_shapes()
        for shape in shapes:
            self.compile_shape(shape)
        return len(shapes)

    @property
    def _top_k(self) -> int:
        """The router's feature size (0 without an MLP router)."""
        return self.router.cfg.top_k if isinstance(self.router, MLPRouter) else 0

    @property
    def _device_router(self) -> object:
        """The router's device form for greedy rounds on device (None: max-probability), or False when it has none."""
        if isinstance(self.router, MLPRouter):
            return self.router.device_params
        return None if isinstance(self.router, MaxProbRouter) else False

    def _pending(self, st: _DrafterSession, states: np.ndarray | None = None) -> list[int]:
        """What the drafter has not seen: t_0, plus a vanilla (or feature-level) backlog, after the positions a
        layer-map Tandem drafter's `states` will fill."""
        written = 0 if states is None or self.runner.cfg.features else states.shape[0]
        return st.tokens[int(self.runner.lengths[st.slot]) + written :]

    def _gamma(self, st: _DrafterSession, max_drafts: int) -> int:
        return max(1, min(max_drafts, st.spec.gamma_max))

    def _draft_on_device(self, group: list[tuple[_Round, _DrafterSession, np.ndarray | None]]) -> None:
        """Greedy rounds of the group's sessions, drafted together on device until each one's τ or γ (after writing
        their new primary states, Tandem)."""
        pending = [self._pending(st, h) for _, st, h in group]
        for _, st, _ in group:
            st.round_start = len(st.tokens) - 1
        try:
            drafts = self.runner.draft_greedy(
                pending,
                [st.slot for _, st, _ in group],
                [self._gamma(st, c.max_drafts) for c, st, _ in group],
                [st.spec.tau for _, st, _ in group],
                self._device_router,  # type: ignore[arg-type]
                self._top_k,
                [st.spec.first_tau for _, st, _ in group],
                [h for _, _, h in group] if self.tandem else None,
            )
        except Exception as e:
            for c, _, _ in group:
                c.error = e
            return
        for (c, st, _), d in zip(group, drafts, strict=True):
            st.drafts = d
            c.result = Drafts(d, [])

    def _draft_on_host(self, st: _DrafterSession, max_drafts: int, features: np.ndarray | None = None) -> Drafts:
        """Feeds what the drafter has not seen (a feature-level drafter with `features`, see `_features`), then drafts
        step by step until τ or the budget (sampled rounds, and routers without a device form); no drafts when the
        first one's confidence is below τ_first."""
        gamma = self._gamma(st, max_drafts)
        st.round_start = len(st.tokens) - 1
        inputs = None if features is None else features[None]  # [1, n_pending, n_taps, P]
        logits = self.runner.step(np.asarray([self._pending(st)]), rows=[st.slot], features=inputs)[0]
        drafts: list[int] = []
        proposals: list[SparseDist] = []
        if not speculates(self.router, logits, st.spec.first_tau):
            st.drafts = drafts
            return Drafts(drafts, proposals)
        while True:
            q = proposal(logits, st.sampling, st.spec.draft_top_k)
            drafts.append(int(q.ids[0]) if st.sampling.greedy else sample_sparse(q, st.rng))
            proposals.append(q)
            if not keep_drafting(self.router, logits, len(drafts), gamma, st.spec.tau):
                break
            own = self.runner.last_outputs[:, None] if self.runner.cfg.features else None  # [1, 1, D]
            logits = self.runner.step(np.asarray([[drafts[-1]]]), rows=[st.slot], own=own)[0]
        st.drafts = drafts
        return Drafts(drafts, [] if st.sampling.greedy else proposals)


class LocalDrafter:
    """A DrafterAPI for one session of an in-process DrafterWorker."""

    def __init__(self, worker: DrafterWorker, session: str) -> None:
        self.worker, self.session = worker, session

    def start(self, prompt_ids: Sequence[int], hidden: np.ndarray | None, first_token: int, max_drafts: int) -> Drafts:
        return self.worker.start(self.session, prompt_ids, hidden, first_token, max_drafts)

    def advance(
        self,
        accepted: int,
        hidden: np.ndarray | None,
        next_token: int,
        max_drafts: int,
        skipped: Sequence[int] = (),
    ) -> Drafts:
        return self.worker.advance(self.session, accepted, hidden, next_token, max_drafts, skipped)

    def close(self) -> None:
        self.worker.release(self.session)
