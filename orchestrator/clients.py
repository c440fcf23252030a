"""The model services seen through `tandem.decoding.rounds`' PrimaryAPI / DrafterAPI: what lets the orchestrator run the
same request loop as the in-process engine."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import NoReturn

import grpc
import numpy as np

from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.rounds import Drafts, PrimaryStep
from tandem.decoding.speculative import SparseDist
from tandem.errors import (
    DrafterUnavailableError,
    InvalidRequestError,
    PrimaryUnavailableError,
    SessionNotFoundError,
    TandemError,
)
from tandemrpc.convert import numpy_to_tensor, optional_tensor, sampling_to_proto, sparse_from_proto, sparse_to_proto
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc


class ModelServiceError(TandemError):
    """A model service answered with an error status; the orchestrator passes the status on."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{service}: {details}")
        self.code = code


def _raise_from(service: str, e: grpc.RpcError) -> NoReturn:
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise InvalidRequestError(f"{service}: {details}") from None
    if code == grpc.StatusCode.NOT_FOUND:
        raise SessionNotFoundError(f"{service}: {details}") from None
    # Unreachable, or shut down mid-call (we never cancel unary calls ourselves): the request loop may fail over.
    if service == "primary" and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        raise PrimaryUnavailableError(f"{service}: {details}") from None
    raise ModelServiceError(service, code, details or code.name) from None


class RemotePrimary:
    """PrimaryAPI over the Primary service.

    Each call's timeout is `timeout_s`, cut to what is left before `deadline` (time.monotonic(); the client's
    deadline, propagated), so a request never outlives its caller.
    """

    def __init__(
        self, channel: grpc.Channel, vocab_size: int, timeout_s: float = 60.0, deadline: float | None = None
    ) -> None:
        self.stub = pb_grpc.PrimaryStub(channel)
        self.vocab_size, self._timeout_s, self.deadline = vocab_size, timeout_s, deadline

    @property
    def timeout_s(self) -> float:
        if self.deadline is None:
            return self._timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ModelServiceError("primary", grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        return min(self._timeout_s, left)

    def _step(self, resp: pb.PrimaryStep) -> PrimaryStep:
        hidden = optional_tensor(resp.hidden, resp.HasField("hidden"), "primary hidden states")
        return PrimaryStep(resp.accepted, resp.next_token, hidden, max(0, resp.sessions), tuple(resp.prior_tokens))

    def prefill(
        self, session: str, prompt_ids: Sequence[int], sampling: SamplingParams, want_hidden: bool
    ) -> PrimaryStep:
        req = pb.PrefillRequest(
            session_id=session,
            prompt_ids=list(prompt_ids),
            sampling=sampling_to_proto(sampling),
            want_hidden=want_hidden,
        )
        try:
            return self._step(self.stub.Prefill(req, timeout=self.timeout_s))
        except grpc.RpcError as e:
            _raise_from("primary", e)

    def verify(
        self,
        session: str,
        tokens: Sequence[int],
        proposals: Sequence[SparseDist],
        verify: bool,
        want_hidden: bool,
        steps: int = 1,
    ) -> PrimaryStep:
        req = pb.VerifyRequest(
            session_id=session,
            tokens=list(tokens),
            proposals=[sparse_to_proto(q) for q in proposals],
            standalone=not verify,
            want_hidden=want_hidden,
            steps=steps,
        )
        try:
            return self._step(self.stub.Verify(req, timeout=self.timeout_s))
        except grpc.RpcError as e:
            _raise_from("primary", e)

    def release(self, session: str) -> bool:
        try:  # releasing must work after the deadline too
            return self.stub.Release(pb.ReleaseRequest(session_id=session), timeout=self._timeout_s).released
        except grpc.RpcError:
            return False  # the primary's session TTL frees it if this call cannot


_END = object()
# Secondary statuses after which a request goes on without its drafter (lossless: the primary finishes it). A bad
# request (INVALID_ARGUMENT, FAILED_PRECONDITION) is the orchestrator's bug and still fails loudly.
_DRAFTER_DOWN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,  # the Secondary server shut down mid-stream
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.NOT_FOUND,  # the session expired on the Secondary (idle TTL)
    }
)


class RemoteDrafter:
    """DrafterAPI over one Secondary.Draft stream (one per request)."""

    def __init__(
        self,
        channel: grpc.Channel,
        session: str,
        drafter: pb.Drafter,
        sampling: SamplingParams,
        spec: SpecConfig,
        vocab_size: int,
        timeout_s: float = 600.0,
    ) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self._call = pb_grpc.SecondaryStub(channel).Draft(iter(self._requests.get, _END), timeout=timeout_s)
        self._responses: Iterator[pb.DraftResponse] = self._call
        self._closed = False
        self.session, self.drafter, self.vocab_size = session, drafter, vocab_size
        self.sampling, self.spec = sampling, spec

    def _exchange(self, req: pb.DraftRequest) -> Drafts:
        """One request/response on the stream.

        Raises:
            DrafterUnavailableError: the Secondary service is down, its stream broke, it has no free slot or it failed
                internally; the request loop then finishes the request with the primary alone.
        """
        self._requests.put(req)
        try:
            resp = next(self._responses)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code in _DRAFTER_DOWN and not self._closed:  # not our own cancellation (close)
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                raise DrafterUnavailableError(f"secondary: {code.name}: {details}") from None
            _raise_from("secondary", e)
        except StopIteration:
            raise DrafterUnavailableError("secondary: draft stream ended early") from None
        proposals = [sparse_from_proto(q, self.vocab_size) for q in resp.proposals]
        return Drafts(list(resp.tokens), proposals, resp.looked_up)

    @staticmethod
    def _hidden(hidden: np.ndarray | None) -> pb.Tensor | None:
        return None if hidden is None else numpy_to_tensor(hidden)

    def start(self, prompt_ids: Sequence[int], hidden: np.ndarray | None, first_token: int, max_drafts: int) -> Drafts:
        start = pb.DraftStart(
            session_id=self.session,
            drafter=self.drafter,
            prompt_ids=list(prompt_ids),
            hidden=self._hidden(hidden),
            first_token=first_token,
            sampling=sampling_to_proto(self.sampling),
            gamma_max=self.spec.gamma_max,
            tau=self.spec.tau,
            max_drafts=max_drafts,
            draft_top_k=self.spec.draft_top_k,
            tau_first=self.spec.tau_first,
            lookup_ngram=self.spec.lookup_ngram,
        )
        return self._exchange(pb.DraftRequest(start=start))

    def advance(
        self,
        accepted: int,
        hidden: np.ndarray | None,
        next_token: int,
        max_drafts: int,
        skipped: Sequence[int] = (),
    ) -> Drafts:
        adv = pb.DraftAdvance(
            accepted=accepted,
            hidden=self._hidden(hidden),
            next_token=next_token,
            max_drafts=max_drafts,
            skipped=list(skipped),
        )
        return self._exchange(pb.DraftRequest(advance=adv))

    def close(self, wait_s: float = 1.0) -> None:
        """Ends the stream and waits (at most wait_s) for the service to finish it, which releases the session there,
        so the drafter slot is free again before the request's last chunk reaches the client. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._requests.put(_END)  # half-close: the service's loop ends and its finally releases the session
            finished = threading.Event()
            if self._call.add_callback(finished.set):  # False: the call has already ended
                finished.wait(wait_s)
            self._call.cancel()
