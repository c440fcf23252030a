"""Stop strings over a stream of text deltas. JAX-free."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringFilter:
    """Passes text deltas through, holding back just enough to catch a stop string split across deltas.

    After a stop string appears, `push` returns the text before it and `stopped` becomes True; later pushes return "".
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[: min(hits)]
        cut = max(0, len(text) - self._hold)
        self._pending = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """The held-back tail once the stream has ended without a stop string."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
