"""A Python client for the public Orchestrator API, sync and asyncio.

from tandemrpc.client import TandemClient
with TandemClient("127.0.0.1:50050") as client:
    for chunk in client.generate("The capital of France is", max_tokens=16):
        print(chunk.text, end="")
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import Any

import grpc

from tandemrpc.convert import FINISH_NAMES, MODE_ENUMS
from tandemrpc.security import TlsFiles, bearer_metadata, open_channel
from tandemrpc.server import GRPC_OPTIONS
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc


def build_request(
    prompt: str | Sequence[int] | Sequence[dict[str, str]],
    *,
    max_tokens: int = 64,
    mode: str = "tandem-speed",
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    gamma_max: int = 0,
    tau: float | None = None,
    request_id: str = "",
    tau_first: float | None = None,
    min_accepted: float | None = None,
    lookup_ngram: int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from text, token ids, or chat messages ([{"role": ..., "content": ...}])."""
    if mode not in MODE_ENUMS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODE_ENUMS)}")
    req = pb.GenerateRequest(
        sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k),
        max_tokens=max_tokens,
        stop=list(stop),
        mode=pb.Mode.Name(MODE_ENUMS[mode]),
        gamma_max=gamma_max,
        request_id=request_id,
    )
    if seed is not None:
        req.sampling.seed = seed
    if tau is not None:
        req.tau = tau
    if tau_first is not None:
        req.tau_first = tau_first
    if min_accepted is not None:
        req.min_accepted = min_accepted
    if lookup_ngram is not None:
        req.lookup_ngram = lookup_ngram
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)  # type: ignore[index]
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)  # type: ignore[arg-type]
    return req


class TandemClient:
    """Blocking client; `generate` yields GenerateResponse chunks as the server streams them.

    Args:
        target: the orchestrator's HOST:PORT.
        timeout_s: deadline per request.
        token: bearer token for a server that requires one.
        tls: TLS files: `ca` verifies the server; `cert` / `key` are presented for mutual TLS. None: plaintext.
    """

    def __init__(
        self, target: str, timeout_s: float | None = None, *, token: str | None = None, tls: TlsFiles | None = None
    ) -> None:
        self.channel = open_channel(target, tls, GRPC_OPTIONS)
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.timeout_s, self.metadata = timeout_s, bearer_metadata(token)

    def generate(self, prompt: str | Sequence[int] | Sequence[dict[str, str]], **kw) -> Iterator[pb.GenerateResponse]:
        yield from self.stub.Generate(build_request(prompt, **kw), timeout=self.timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTandemClient:
    """asyncio client; `generate` is an async iterator of GenerateResponse chunks."""

    def __init__(self, target: str, timeout_s: float | None = None, *, token: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.timeout_s, self.metadata = timeout_s, bearer_metadata(token)

    async def generate(
        self, prompt: str | Sequence[int] | Sequence[dict[str, str]], **kw
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(build_request(prompt, **kw), timeout=self.timeout_s, metadata=self.metadata)
        async for chunk in call:
            yield chunk

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class IncompleteStreamError(RuntimeError):
    """A Generate stream ended without its final chunk."""


@dataclasses.dataclass
class RemoteResult:
    """A finished remote generation, shaped like the in-process engine's result."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict[str, Any]


def stats_from_response(final: pb.GenerateResponse) -> dict[str, Any]:
    """GenerationStats.to_dict() keys that the last chunk's usage and stats carry (no per-call counters)."""
    s, u = final.stats, final.usage
    out = {
        "rounds": s.rounds,
        "drafted_tokens": s.drafted_tokens,
        "accepted_tokens": s.accepted_tokens,
        "accepted_per_position": list(s.accepted_per_position),
        "declined_rounds": s.declined_rounds,
        "lookup_rounds": s.lookup_rounds,
        "lookup_drafted_tokens": s.lookup_drafted_tokens,
        "lookup_accepted_tokens": s.lookup_accepted_tokens,
        "prompt_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "ttft_s": s.ttft_s,
        "elapsed_s": s.elapsed_s,
    }
    out["tokens_per_s"] = u.completion_tokens / s.elapsed_s if s.elapsed_s > 0 else 0.0
    out["acceptance_rate"] = s.accepted_tokens / s.drafted_tokens if s.drafted_tokens else 0.0
    out["mean_acceptance_length"] = s.mean_acceptance_length
    return out


def stream_remote(
    client: TandemClient, prompt: str | Sequence[int] | Sequence[dict[str, str]], **kw: Any
) -> Generator[str, None, RemoteResult]:
    """Yields the text deltas of one Generate call and returns its RemoteResult (kw: TandemClient.generate's).

    Raises:
        grpc.RpcError: the call failed.
        IncompleteStreamError: the stream ended without a final chunk.
    """
    pieces: list[str] = []
    token_ids: list[int] = []
    final: pb.GenerateResponse | None = None
    for chunk in client.generate(prompt, **kw):  # read to the end: the server records the request after the last chunk
        token_ids.extend(chunk.token_ids)
        pieces.append(chunk.text)
        yield chunk.text
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            final = chunk
    if final is None:
        raise IncompleteStreamError("the orchestrator ended the stream without a final chunk")
    reason = FINISH_NAMES.get(final.finish_reason, pb.FinishReason.Name(final.finish_reason))
    return RemoteResult("".join(pieces), token_ids, reason, stats_from_response(final))
