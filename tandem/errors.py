"""Errors the library raises for problems a caller can act on. JAX-free; the services map each to a gRPC status.

InvalidRequestError   -> INVALID_ARGUMENT    (bad parameters, bad tensors, prompt too long)
SessionNotFoundError  -> NOT_FOUND           (unknown, released or expired session)
SessionStateError     -> FAILED_PRECONDITION (a call out of order for the session's state)
PoolExhaustedError    -> RESOURCE_EXHAUSTED  (every cache slot is taken; retry later)
OverloadedError       -> RESOURCE_EXHAUSTED  (admission limit reached; carries a retry hint)

PrimaryUnavailableError -> UNAVAILABLE       (the primary replica is gone and no other one can take the request over)

DrafterUnavailableError is not sent to clients: the request loop catches it and finishes the request with the primary
alone (the primary can always finish a request, so a drafter failure costs speed, never output).
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class of the errors below."""


class InvalidRequestError(TandemError, ValueError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""


class ContextFullError(InvalidRequestError):
    """A block does not fit in the remaining cache positions of a sequence."""


class SessionNotFoundError(TandemError, KeyError):
    """No live session has this id (never opened, released, or expired)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class SessionStateError(TandemError):
    """The call does not fit the session's state (for example a round before the session started)."""


class PoolExhaustedError(TandemError):
    """Every cache slot is in use."""


class OverloadedError(PoolExhaustedError):
    """The server is at its admission limit (every running place taken and the queue full, or a queued request waited
    too long). Maps to RESOURCE_EXHAUSTED like a full pool; `retry_after_s` is the server's hint."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DrafterUnavailableError(TandemError):
    """The drafter cannot draft for this request (service down, stream broken, no free slot)."""


class PrimaryUnavailableError(TandemError):
    """The primary replica serving a request is unreachable; the request loop may re-prefill on another replica."""


class WarmupError(TandemError):
    """A service's warm-up cannot fit within this process's limits (`tandem.decoding.warmup`): it refuses to start."""
