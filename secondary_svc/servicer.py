"""The Secondary gRPC servicer: one bidirectional stream per request over `tandem.decoding.workers.DrafterWorker`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc

from tandem.config import SpecConfig
from tandem.decoding.rounds import Drafts
from tandem.decoding.workers import DrafterWorker
from tandem.errors import InvalidRequestError, SessionStateError, TandemError
from tandemrpc.convert import optional_tensor, sampling_from_proto, sparse_to_proto
from tandemrpc.server import status_for
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

DRAFTER_NAMES: dict[int, str] = {
    pb.DRAFTER_UNSPECIFIED: "tandem",
    pb.DRAFTER_TANDEM: "tandem",
    pb.DRAFTER_VANILLA: "vanilla",
}


def _response(drafts: Drafts) -> pb.DraftResponse:
    return pb.DraftResponse(
        tokens=drafts.tokens, proposals=[sparse_to_proto(q) for q in drafts.proposals], looked_up=drafts.looked_up
    )


class SecondaryServicer(pb_grpc.SecondaryServicer):
    def __init__(self, workers: dict[str, DrafterWorker]) -> None:
        self.workers = workers

    def _worker(self, drafter: int) -> DrafterWorker:
        name = DRAFTER_NAMES.get(drafter)
        if name is None or name not in self.workers:
            raise InvalidRequestError(f"unknown drafter {drafter}; this server has {', '.join(self.workers)}")
        return self.workers[name]

    def Draft(
        self, request_iterator: Iterator[pb.DraftRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DraftResponse]:
        session: str | None = None
        worker: DrafterWorker | None = None
        try:
            for req in request_iterator:
                kind = req.WhichOneof("kind")
                if kind == "start":
                    if session is not None:
                        raise SessionStateError("this stream has already started a session")
                    s = req.start
                    worker = self._worker(s.drafter)
                    try:
                        spec = SpecConfig(
                            gamma_max=s.gamma_max,
                            tau=s.tau,
                            draft_top_k=s.draft_top_k or 16,
                            tau_first=s.tau_first,
                            lookup_ngram=s.lookup_ngram,
                        )
                    except ValueError as e:
                        raise InvalidRequestError(str(e)) from None
                    session = s.session_id or uuid.uuid4().hex
                    worker.open(session, sampling_from_proto(s.sampling), spec)
                    hidden = optional_tensor(s.hidden, s.HasField("hidden"), "start.hidden")
                    yield _response(worker.start(session, list(s.prompt_ids), hidden, s.first_token, s.max_drafts))
                elif kind == "advance":
                    if session is None or worker is None:
                        raise SessionStateError("send a DraftStart before any DraftAdvance")
                    a = req.advance
                    hidden = optional_tensor(a.hidden, a.HasField("hidden"), "advance.hidden")
                    drafts = worker.advance(session, a.accepted, hidden, a.next_token, a.max_drafts, list(a.skipped))
                    yield _response(drafts)
                else:
                    raise InvalidRequestError("a DraftRequest must carry start or advance")
        except TandemError as e:
            context.abort(status_for(e), str(e))
        finally:
            if session is not None and worker is not None:
                worker.release(session)
