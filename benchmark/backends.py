"""Where a generation runs: the in-process engine, the public gRPC API, or a peer implementation (Hugging Face
transformers, `benchmark.peer_hf`); each reports a `Sample` as a client sees it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from benchmark.config import PEER_MODES
from benchmark.metrics import busy_seconds
from benchmark.stats import Sample
from tandem.config import SamplingParams, SpecConfig

if TYPE_CHECKING:
    from tandem.decoding.bundle import BundleConfig
    from tandem.decoding.engine import Engine


class Backend(Protocol):
    """Runs one greedy generation and reports it as the client saw it."""

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample: ...


class InProcessBackend:
    """The in-process engine; TTFT and E2EL are taken around `Engine.stream` like a client would."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _busy_s(self) -> float:
        """The workers' model time so far (each drafter worker once, though two modes share the Tandem one)."""
        drafters = {id(w): w for w in self.engine.drafters.values() if w is not None}.values()
        return self.engine.primary_worker.busy_s + sum((w.busy_s for w in drafters), 0.0)

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        tokens: list[int] = []
        ttft: float | None = None
        busy = self._busy_s()
        start = time.perf_counter()
        stream = self.engine.stream(prompt_ids, mode=mode, max_tokens=max_tokens, sampling=SamplingParams(), spec=spec)
        while True:
            try:
                chunk = next(stream)
            except StopIteration as done:
                result = done.value
                break
            if chunk and ttft is None:
                ttft = time.perf_counter() - start
            tokens.extend(chunk)
        e2el = time.perf_counter() - start
        s = result.stats
        return Sample(
            token_ids=tuple(tokens),
            ttft_s=ttft,
            e2el_s=e2el,
            finish_reason=result.finish_reason,
            rounds=s.rounds,
            drafted_tokens=s.drafted_tokens,
            accepted_tokens=s.accepted_tokens,
            accepted_per_position=tuple(s.accepted_per_position),
            primary_calls=s.primary_calls,
            drafter_calls=s.drafter_calls,
            lookup_rounds=s.lookup_rounds,
            lookup_drafted_tokens=s.lookup_drafted_tokens,
            lookup_accepted_tokens=s.lookup_accepted_tokens,
            model_s=self._busy_s() - busy,
        )


class GrpcBackend:
    """The public Orchestrator API; the counters come from the final GenerateResponse chunk.

    Args:
        target: the orchestrator's HOST:PORT.
        timeout_s: deadline per request.
        service_metrics: the Prometheus endpoints of the model services behind it; their busy-seconds gauges, read
            before and after each request (outside its timing), give the request's model time (empty: unknown).
    """

    def __init__(self, target: str, timeout_s: float | None = 600.0, service_metrics: Sequence[str] = ()) -> None:
        from tandemrpc.client import TandemClient

        self.target, self.service_metrics = target, tuple(service_metrics)
        self.client = TandemClient(target, timeout_s=timeout_s)

    def _busy_s(self) -> float | None:
        return sum(busy_seconds(url) for url in self.service_metrics) if self.service_metrics else None

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        from tandemrpc.client import IncompleteStreamError
        from tandemrpc.convert import FINISH_NAMES
        from tandemrpc.v1 import tandem_pb2 as pb

        tokens: list[int] = []
        ttft: float | None = None
        passes = 0
        final: Any = None
        busy = self._busy_s()
        start = time.perf_counter()
        chunks = self.client.generate(
            [int(t) for t in prompt_ids],
            mode=mode,
            max_tokens=max_tokens,
            gamma_max=spec.gamma_max,
            tau=spec.tau,
            tau_first=spec.tau_first,
            min_accepted=spec.min_accepted,
            lookup_ngram=spec.lookup_ngram,
        )
        for chunk in chunks:  # read to the end: the last chunk carries the counters
            if chunk.token_ids:
                if ttft is None:
                    ttft = time.perf_counter() - start
                passes += 1
                tokens.extend(chunk.token_ids)
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                final = chunk
        e2el = time.perf_counter() - start
        if final is None:
            raise IncompleteStreamError(f"{self.target}: the stream ended without its final chunk")
        after = self._busy_s()
        st = final.stats
        return Sample(
            token_ids=tuple(tokens),
            ttft_s=ttft,
            e2el_s=e2el,
            finish_reason=FINISH_NAMES.get(final.finish_reason, str(final.finish_reason)),
            rounds=st.rounds,
            drafted_tokens=st.drafted_tokens,
            accepted_tokens=st.accepted_tokens,
            accepted_per_position=tuple(st.accepted_per_position),
            primary_calls=passes,
            drafter_calls=st.rounds + st.declined_rounds,  # the request loop asks the drafter once per round
            lookup_rounds=st.lookup_rounds,
            lookup_drafted_tokens=st.lookup_drafted_tokens,
            lookup_accepted_tokens=st.lookup_accepted_tokens,
            model_s=None if busy is None or after is None else after - busy,
        )

    def close(self) -> None:
        self.client.close()


class PeerResultLike(Protocol):
    """What a peer's generate returns (benchmark.peer_hf.PeerResult)."""

    @property
    def token_ids(self) -> list[int]: ...
    @property
    def ttft_s(self) -> float: ...
    @property
    def elapsed_s(self) -> float: ...
    @property
    def assistant_calls(self) -> int: ...


class Peer(Protocol):
    """Another implementation run on the same prompts (benchmark.peer_hf.HFPeer)."""

    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def generate(self, prompt_ids: list[int], max_tokens: int, *, assisted: bool) -> PeerResultLike: ...


class PeerBackend:
    """Modes hf (the peer's plain greedy decoding) and hf-assisted (its assisted generation); the peer times itself."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        if mode not in PEER_MODES:
            raise ValueError(f"the peer runs modes {', '.join(PEER_MODES)}, not {mode!r}")
        res = self.peer.generate([int(t) for t in prompt_ids], max_tokens, assisted=mode == "hf-assisted")
        ids = tuple(int(t) for t in res.token_ids)
        return Sample(
            token_ids=ids,
            ttft_s=res.ttft_s if ids else None,
            e2el_s=res.elapsed_s,
            finish_reason="length" if len(ids) >= max_tokens else "stop",
            drafter_calls=res.assistant_calls if mode == "hf-assisted" else 0,
        )


def load_peer(name: str, bundle_cfg: BundleConfig) -> Peer:
    """The peer implementation `name` ("hf"), imported only now.

    Raises:
        SystemExit: its dependencies (torch, transformers) are not installed.
    """
    if name != "hf":
        raise SystemExit(f"tandem bench: unknown peer {name!r}")
    try:
        from benchmark.peer_hf import HFPeer
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise SystemExit(
            f"tandem bench: --peer hf needs torch and transformers ({missing} is missing): pip install '.[peer]'"
        ) from None
    peer: Peer = HFPeer(bundle_cfg)
    return peer
