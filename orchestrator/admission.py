"""Bounded admission: how many requests run at once, how many wait, and the adaptive limit under a TPOT target."""

from __future__ import annotations

import collections
import math
import threading
import time

from tandem.errors import OverloadedError


class Admission:
    """Bounded admission: up to `limit` requests run, up to max_queued wait (first come, first served) for at most
    timeout_s, and any more are turned away at once with a retry hint.

    Without a TPOT target the limit is max_running. With one, the limit adapts to keep the time per output token of
    running requests under the target (a batched step, and every admitted request's prefill, slows every request
    running): each chunk's per-token latency feeds an exponential average, and at most once per `adjust_every_s`
    - above the target, the limit drops in proportion to the overshoot: to running · target / average (at least one
      less, never below 1), judged only once the running requests are within the limit, so a cut is not repeated
      before the requests admitted under the old limit have drained;
    - below `headroom` · target, it grows by one, but only while it binds (as many running as it allows): a limit
      that nothing has tested is not raised, so an idle server does not admit a burst at a size it never measured.
    It starts at 1 (a slow start), so the first burst of an overload is not admitted before anything was measured.
    """

    def __init__(
        self,
        max_running: int,
        max_queued: int,
        timeout_s: float,
        tpot_target_s: float | None = None,
        adjust_every_s: float = 0.5,
        headroom: float = 0.7,
    ) -> None:
        if max_running < 1 or max_queued < 0 or timeout_s < 0 or (tpot_target_s is not None and tpot_target_s <= 0):
            raise ValueError("need max_running >= 1, max_queued >= 0, queue_timeout_s >= 0 and a positive TPOT target")
        if not 0 < headroom < 1:
            raise ValueError(f"headroom must lie in (0, 1), got {headroom}")
        self.max_running, self.max_queued, self.timeout_s = max_running, max_queued, timeout_s
        self.tpot_target_s, self.adjust_every_s, self.headroom = tpot_target_s, adjust_every_s, headroom
        self.limit = max_running if tpot_target_s is None else 1
        self.tpot_s = 0.0  # the exponential average of per-token latency (with a target)
        self._adjusted = 0.0
        self._cv = threading.Condition()
        self.running = 0
        self._queue: collections.deque[object] = collections.deque()

    def observe(self, seconds: float, tokens: int) -> None:
        """A running request emitted `tokens` tokens `seconds` after its previous chunk."""
        if self.tpot_target_s is None or tokens < 1:
            return
        with self._cv:
            per_token = seconds / tokens
            self.tpot_s = per_token if self.tpot_s == 0 else 0.9 * self.tpot_s + 0.1 * per_token
            now = time.monotonic()
            if now - self._adjusted < self.adjust_every_s:
                return
            if self.tpot_s > self.tpot_target_s:
                if self.running <= self.limit and self.limit > 1:
                    fits = math.floor(self.running * self.tpot_target_s / self.tpot_s)
                    self.limit = max(1, min(self.limit - 1, fits))
                    self._adjusted = now
            elif (
                self.tpot_s < self.headroom * self.tpot_target_s
                and self.running >= self.limit
                and self.limit < self.max_running
            ):
                self.limit += 1
                self._adjusted = now
                self._cv.notify_all()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _retry_hint_s(self) -> float:
        return 1.0 + self.queued / self.limit  # about one request's time per wave ahead of the caller

    def enter(self, time_remaining_s: float | None = None) -> None:
        """Takes a running place, waiting in the queue if need be.

        Raises:
            OverloadedError: the queue is full, or no place freed up within timeout_s (or the caller's deadline).
        """
        with self._cv:
            if self.running < self.limit and not self._queue:
                self.running += 1
                return
            if len(self._queue) >= self.max_queued:
                hint = self._retry_hint_s()
                raise OverloadedError(
                    f"server busy: {self.running} requests running and {len(self._queue)} queued (the limits); "
                    f"retry in about {hint:.1f} s",
                    hint,
                )
            ticket = object()
            self._queue.append(ticket)
            wait_s = self.timeout_s if time_remaining_s is None else min(self.timeout_s, time_remaining_s)
            admitted = self._cv.wait_for(lambda: self.running < self.limit and self._queue[0] is ticket, timeout=wait_s)
            if not admitted:
                self._queue.remove(ticket)
                self._cv.notify_all()
                hint = self._retry_hint_s()
                raise OverloadedError(
                    f"server busy: no running place freed up within {wait_s:.1f} s; retry in about {hint:.1f} s", hint
                )
            self._queue.popleft()
            self.running += 1
            self._cv.notify_all()

    def leave(self) -> None:
        """Frees a running place."""
        with self._cv:
            self.running -= 1
            self._cv.notify_all()
