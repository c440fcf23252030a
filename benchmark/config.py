"""What one benchmark run measures: the modes (each optionally with its own speculation settings) and the vias."""

from __future__ import annotations

import dataclasses

from tandem.config import MODES, SpecConfig

VIAS = ("in-process", "grpc")
VIA_CHOICES = {"in-process": ("in-process",), "grpc": ("grpc",), "both": ("in-process", "grpc")}
# The peer implementations, run in this process on the same prompts: name -> (plain greedy mode, speculative mode).
# hf: Hugging Face transformers (benchmark.peer_hf), plain and assisted by the vanilla drafter; llamacpp: llama.cpp
# through llama-cpp-python (benchmark.peer_llamacpp), plain and with its prompt-lookup drafting.
PEERS: dict[str, tuple[str, str]] = {
    "hf": ("hf", "hf-assisted"),
    "llamacpp": ("llamacpp", "llamacpp-lookup"),
}
PEER_MODES = tuple(mode for modes in PEERS.values() for mode in modes)
LOSSY_MODES = frozenset({"tandem"})  # standalone Tandem keeps drafts unverified: differing from primary is by design
BASELINE = "primary"


MODE_SETTINGS = "MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED[:LOOKUP_NGRAM]]"


def split_mode(label: str) -> tuple[str, SpecConfig | None]:
    """A mode label, `MODE` or `MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED[:LOOKUP_NGRAM]]`, as (engine mode, its own
    settings or None). Unwritten trailing settings take SpecConfig's defaults.

    Raises:
        ValueError: settings that are not three to five numbers, or out of range.
    """
    mode, sep, settings = label.partition("@")
    if not sep:
        return mode, None
    parts = settings.split(":")
    try:
        if not 3 <= len(parts) <= 5:
            raise ValueError("expected three to five values")
        min_accepted = float(parts[3]) if len(parts) >= 4 else SpecConfig.min_accepted
        lookup_ngram = int(parts[4]) if len(parts) == 5 else SpecConfig.lookup_ngram
        return mode, SpecConfig(
            tau_first=float(parts[0]),
            tau=float(parts[1]),
            gamma_max=int(parts[2]),
            min_accepted=min_accepted,
            lookup_ngram=lookup_ngram,
        )
    except ValueError as e:
        raise ValueError(f"mode {label!r}: expected {MODE_SETTINGS} ({e})") from None


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures.

    Attributes:
        modes: engine modes (tandem.config.MODES), run in this order; must include "primary" (the baseline). A mode
            may carry its own speculation settings as `MODE@TAU_FIRST:TAU:GAMMA_MAX[:MIN_ACCEPTED[:LOOKUP_NGRAM]]`
            (e.g. `tandem-speed@0:0.8:7`, or `tandem-speed@0:0.8:4:0:3` with prompt lookup from 3-grams), so
            settings are compared like modes: interleaved, in one run, the label keying every result.
        vias: "in-process" and/or "grpc".
        max_tokens: tokens generated per prompt.
        gamma_max: most tokens drafted per round (sent explicitly over gRPC too, so both vias draft alike).
        tau: keep drafting while the router's confidence >= tau.
        tau_first: a round drafts at all only if the router's confidence in its first draft reaches this.
        min_accepted: speculation pauses while a request's rounds keep fewer drafts on average
            (`tandem.decoding.rounds.Pacer`).
        lookup_ngram: prompt lookup's shortest matching n-gram (`tandem.decoding.lookup`; 0: off).
        repeats: passes over the prompt set; per prompt, times are the median over repeats.
        warmup_tokens: tokens of each warm-up generation (None: max_tokens).
        block_cost_context: cached tokens before the block-cost calls (0: an empty cache; None: skip the curve).
        block_cost_max_k: the curve covers k = 1..block_cost_max_k.
        block_cost_calls: timed calls per k (median), after two warm-up calls.
        peers: peer implementations (`PEERS`), each adding its two modes after the engine's, in this order: "hf" the
            modes hf and hf-assisted (benchmark.peer_hf.HFPeer), "llamacpp" the modes llamacpp and llamacpp-lookup
            (benchmark.peer_llamacpp.LlamaCppPeer); all in process. Empty: no peer.
        prefix_cache_rows: the Primary's prefix cache (`tandem.model.kvcache.PrefixCache`) in process and in services
            started here. 0 (off) by default: the modes run the same prompts one after another, and with the cache
            every mode but the first on a prompt would reuse all of it but its last token.
    """

    modes: tuple[str, ...] = MODES
    vias: tuple[str, ...] = VIAS
    max_tokens: int = 128
    gamma_max: int = SpecConfig.gamma_max
    tau: float = SpecConfig.tau
    tau_first: float = SpecConfig.tau_first
    min_accepted: float = SpecConfig.min_accepted
    lookup_ngram: int = SpecConfig.lookup_ngram
    repeats: int = 1
    warmup_tokens: int | None = None
    block_cost_context: int | None = 256
    block_cost_max_k: int = 16
    block_cost_calls: int = 9
    peers: tuple[str, ...] = ()
    prefix_cache_rows: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if split_mode(m)[0] not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
        if BASELINE not in self.modes:
            raise ValueError(f"modes must include {BASELINE!r}: it is the baseline of speedups and identity checks")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes repeat: {', '.join(self.modes)}")
        if not self.vias or any(v not in VIAS for v in self.vias) or len(set(self.vias)) != len(self.vias):
            raise ValueError(f"vias must be distinct values of {', '.join(VIAS)}, got {self.vias}")
        if self.max_tokens < 1 or self.repeats < 1 or self.block_cost_max_k < 1 or self.block_cost_calls < 1:
            raise ValueError("max_tokens, repeats, block_cost_max_k and block_cost_calls must be >= 1")
        if self.prefix_cache_rows < 0:
            raise ValueError(f"prefix_cache_rows must be >= 0, got {self.prefix_cache_rows}")
        if self.warmup_tokens is not None and self.warmup_tokens < 0:
            raise ValueError("warmup_tokens must be >= 0 (0: no warm-up)")
        if self.block_cost_context is not None and self.block_cost_context < 0:
            raise ValueError("block_cost_context must be >= 0")
        if isinstance(self.peers, str):
            raise ValueError(f"peers is a tuple of names, e.g. ({self.peers!r},), not a string")
        unknown_peers = [p for p in self.peers if p not in PEERS]
        if unknown_peers:
            raise ValueError(f"unknown peer(s) {', '.join(unknown_peers)}; expected some of {', '.join(PEERS)}")
        if len(set(self.peers)) != len(self.peers):
            raise ValueError(f"peers repeat: {', '.join(self.peers)}")
        if self.peers and "in-process" not in self.vias:
            raise ValueError("a peer runs in process and is compared with the in-process primary: add in-process")
        for mode in self.modes:
            self.spec_of(mode)  # raises ValueError for a bad gamma_max, tau or tau_first

    @property
    def spec(self) -> SpecConfig:
        return SpecConfig(
            gamma_max=self.gamma_max,
            tau=self.tau,
            tau_first=self.tau_first,
            min_accepted=self.min_accepted,
            lookup_ngram=self.lookup_ngram,
        )

    def spec_of(self, mode: str) -> SpecConfig:
        """The settings a mode label runs with: its own (`MODE_SETTINGS`), else the run's."""
        own = split_mode(mode)[1]
        return own if own is not None else self.spec

    @property
    def all_modes(self) -> tuple[str, ...]:
        """The engine modes, then each peer's two."""
        return self.modes + tuple(mode for peer in self.peers for mode in PEERS[peer])

    def vias_of(self, mode: str) -> tuple[str, ...]:
        """The vias a mode runs through (a peer only in process)."""
        return ("in-process",) if mode in PEER_MODES else self.vias


def peer_of(mode: str) -> str | None:
    """The peer that runs `mode` (a key of `PEERS`), None for an engine mode."""
    return next((name for name, modes in PEERS.items() if mode in modes), None)
