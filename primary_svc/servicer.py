"""The Primary gRPC servicer: translates wire messages to `tandem.decoding.workers.PrimaryWorker` calls and back."""

from __future__ import annotations

import grpc

from tandem.decoding.rounds import PrimaryStep
from tandem.decoding.workers import PrimaryWorker
from tandem.errors import InvalidRequestError
from tandemrpc.convert import numpy_to_tensor, sampling_from_proto, sparse_from_proto
from tandemrpc.server import translate_errors
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

MAX_SESSION_ID = 128


def check_session_id(session_id: str) -> str:
    if not session_id or len(session_id) > MAX_SESSION_ID:
        raise InvalidRequestError(f"session_id must be 1..{MAX_SESSION_ID} characters")
    return session_id


def _step(step: PrimaryStep) -> pb.PrimaryStep:
    out = pb.PrimaryStep(
        accepted=step.accepted, next_token=step.next_token, sessions=step.sessions, prior_tokens=step.prior
    )
    if step.hidden is not None:
        out.hidden.CopyFrom(numpy_to_tensor(step.hidden))
    return out


class PrimaryServicer(pb_grpc.PrimaryServicer):
    def __init__(self, worker: PrimaryWorker) -> None:
        self.worker = worker

    @translate_errors
    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrimaryStep:
        session = check_session_id(request.session_id)
        sampling = sampling_from_proto(request.sampling)
        return _step(self.worker.prefill(session, list(request.prompt_ids), sampling, request.want_hidden))

    @translate_errors
    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.PrimaryStep:
        session = check_session_id(request.session_id)
        proposals = [sparse_from_proto(p, self.worker.vocab_size) for p in request.proposals]
        tokens, verify = list(request.tokens), not request.standalone
        step = self.worker.verify(session, tokens, proposals, verify, request.want_hidden, request.steps)
        return _step(step)

    @translate_errors
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=self.worker.release(check_session_id(request.session_id)))
