"""One public request on its way through the orchestrator: the decoded request (`GenerateParams`), the chunks it
streams, the pods it is pinned to (`Route`) and the handle the servicer iterates and cancels (`Generation`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Generator

from orchestrator.admission import Admission
from orchestrator.clients import RemoteDrafter, RemotePrimary
from orchestrator.routing import Lease
from tandem.config import DEFAULT_MODE, SamplingParams
from tandem.decoding.rounds import GenerationResult


@dataclasses.dataclass(frozen=True)
class GenerateParams:
    """A public request after decoding the proto (input still untokenized)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: tuple[tuple[str, str], ...] | None = None
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    mode: str = DEFAULT_MODE
    gamma_max: int = 0  # 0 = server default
    tau: float | None = None
    tau_first: float | None = None
    min_accepted: float | None = None
    lookup_ngram: int | None = None  # None = server default
    request_id: str = ""


@dataclasses.dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" / "length" on the last chunk
    result: GenerationResult | None = None  # on the last chunk


@dataclasses.dataclass
class Route:
    """The pods one request is pinned to (session affinity); a failover moves its primary side to another pod."""

    primary_lease: Lease
    primary: RemotePrimary
    deadline: float | None = None  # time.monotonic() by which the client wants the request done
    secondary_lease: Lease | None = None
    lost: list[str] = dataclasses.field(default_factory=list)  # primary pods this request lost
    admitted: Admission | None = None  # the admission place it holds until released
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def release(self) -> None:
        """Unpins the request and frees its admission place (idempotent; cancel and close may race)."""
        self.primary_lease.release()
        if self.secondary_lease is not None:
            self.secondary_lease.release()
        with self._lock:
            admitted, self.admitted = self.admitted, None
        if admitted is not None:
            admitted.leave()


class Generation:
    """One request in flight: iterate for chunks; `close()` from the consuming thread, `cancel()` from any thread.

    A cancelled or expired RPC leaves its response generator suspended (gRPC stops pulling from it), so the
    generator's own cleanup would wait for garbage collection. `cancel()` releases both sessions directly instead.
    """

    def __init__(
        self, chunks: Generator[Chunk, None, None], session: str, route: Route, drafter: RemoteDrafter | None
    ) -> None:
        self.chunks, self.session, self.route, self._drafter = chunks, session, route, drafter
        self.finished = False

    def __iter__(self) -> Generator[Chunk, None, None]:
        for chunk in self.chunks:
            yield chunk
            if chunk.finish_reason is not None:
                self.finished = True

    def close(self) -> None:
        self.chunks.close()
        if self._drafter is not None:
            self._drafter.close()  # the stream exists even if the loop never started
        self.route.release()

    def cancel(self) -> None:
        if not self.finished:
            self.route.primary.release(self.session)
            if self._drafter is not None:
                self._drafter.close()
        self.route.release()
