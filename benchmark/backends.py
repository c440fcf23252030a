"""Where a generation runs: the in-process engine, the public gRPC API, or a peer implementation (Hugging Face
transformers, `benchmark.peer_hf`; llama.cpp, `benchmark.peer_llamacpp`); each reports a `Sample` as a client sees it.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from benchmark.config import PEERS
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


@dataclasses.dataclass(frozen=True)
class PeerResult:
    """One generation by a peer (`Peer.generate`), in the shape of our engine's results.

    Attributes:
        token_ids: Generated tokens only (no prompt); a stop token ends the generation and is not included.
        ttft_s: Seconds from the call to its first generated token.
        elapsed_s: Seconds of the whole generation.
        assistant_calls: Passes of a drafter model (0 for plain decoding and for prompt lookup, which runs none).
        primary_calls: Passes of the primary: the prompt's, then one per token (plain) or per round (speculative).
        rounds: Passes that carried drafted tokens; None where the peer does not count them (hf).
        drafted_tokens, accepted_tokens: The drafts, and those greedy decoding confirmed (with rounds).
        accepted_per_position: [j]: rounds that kept draft j+1 (with rounds).
        lookup: The drafts came from prompt lookup (llamacpp-lookup).
    """

    token_ids: list[int]
    ttft_s: float
    elapsed_s: float
    assistant_calls: int = 0
    primary_calls: int = 0
    rounds: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    accepted_per_position: tuple[int, ...] = ()
    lookup: bool = False


class Peer(Protocol):
    """Another implementation run on the same prompts (benchmark.peer_hf.HFPeer, benchmark.peer_llamacpp.LlamaCppPeer).

    `generate(..., assisted=True)` runs the peer's speculative mode (the second of its `PEERS` modes).
    """

    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def generate(self, prompt_ids: list[int], max_tokens: int, *, assisted: bool) -> PeerResult: ...


class PeerBackend:
    """A peer's two modes (`benchmark.config.PEERS`): its plain greedy decoding and its speculative one (hf-assisted:
    a drafter model; llamacpp-lookup: prompt lookup). The peer times itself.

    Drafter calls per token are the peer's assistant (drafter model) calls. A peer whose result counts `rounds` (with
    `drafted_tokens`, `accepted_tokens` and `accepted_per_position`: llama.cpp's prompt lookup) reports them as its
    speculation counters, and as prompt-lookup rounds when `lookup` is set on the result.
    """

    def __init__(self, peer: Peer, name: str) -> None:
        self.peer, self.name = peer, name
        self.plain, self.speculative = PEERS[name]

    def generate(self, prompt_ids: Sequence[int], mode: str, max_tokens: int, spec: SpecConfig) -> Sample:
        if mode not in (self.plain, self.speculative):
            raise ValueError(f"peer {self.name} runs modes {self.plain}, {self.speculative}, not {mode!r}")
        assisted = mode == self.speculative
        res = self.peer.generate([int(t) for t in prompt_ids], max_tokens, assisted=assisted)
        ids = tuple(int(t) for t in res.token_ids)
        lookup = res.lookup and res.rounds is not None
        return Sample(
            token_ids=ids,
            ttft_s=res.ttft_s if ids else None,
            e2el_s=res.elapsed_s,
            finish_reason="length" if len(ids) >= max_tokens else "stop",
            rounds=res.rounds,
            drafted_tokens=res.drafted_tokens,
            accepted_tokens=res.accepted_tokens,
            accepted_per_position=tuple(res.accepted_per_position),
            primary_calls=res.primary_calls if res.rounds is not None else None,
            drafter_calls=res.assistant_calls if assisted else 0,
            lookup_rounds=res.rounds if lookup else None,
            lookup_drafted_tokens=res.drafted_tokens if lookup else None,
            lookup_accepted_tokens=res.accepted_tokens if lookup else None,
        )


# Per peer: its module and class, what it needs, and how to get it.
_PEER_IMPLS: dict[str, tuple[str, str, str, str]] = {
    "hf": ("benchmark.peer_hf", "HFPeer", "torch and transformers", "pip install '.[peer]'"),
    "llamacpp": (
        "benchmark.peer_llamacpp",
        "LlamaCppPeer",
        "llama-cpp-python",
        "build it for this host with docker/build-llamacpp.sh (the llamacpp extra)",
    ),
}


def load_peer(name: str, bundle_cfg: BundleConfig) -> Peer:
    """The peer implementation `name` (a key of `benchmark.config.PEERS`), imported only now.

    Raises:
        SystemExit: an unknown peer, or its dependencies are not installed: torch and transformers (hf), a
            llama-cpp-python built by docker/build-llamacpp.sh (llamacpp).
    """
    if name not in _PEER_IMPLS:
        raise SystemExit(f"tandem bench: unknown peer {name!r}; expected some of {', '.join(PEERS)}")
    module, cls, needs, get = _PEER_IMPLS[name]
    try:
        impl = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise SystemExit(f"tandem bench: --peer {name} needs {needs} ({missing} is missing): {get}") from None
    except (OSError, RuntimeError) as e:  # llama_cpp loads its shared library when imported
        raise SystemExit(f"tandem bench: --peer {name}: its library would not load ({e}): {get}") from None
    peer: Peer = impl(bundle_cfg)
    return peer
