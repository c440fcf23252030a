"""Frozen configuration dataclasses shared by the library, the services and the CLI.

This module imports neither JAX nor gRPC, so the orchestrator and the command line can read configs cheaply.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# Modes the engine and the services run, per request.
MODES = ("primary", "speed", "tandem", "tandem-speed")
SPECULATIVE_MODES = ("speed", "tandem-speed")  # the modes whose drafts the primary verifies (lossless)
DEFAULT_MODE = "tandem-speed"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-architecture primary (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

    vocab_size: int = 49152  # tokenizer size; SmolLM2's byte-level BPE
    d_model: int = 576  # residual stream width D
    n_layers: int = 30  # decoder blocks L
    n_heads: int = 9  # query heads N
    n_kv_heads: int = 3  # key/value heads K (N % K == 0; each K head serves N / K query heads)
    head_dim: int = 64  # H; d_model == n_heads * head_dim for SmolLM2 but not required
    ffn_dim: int = 1536  # SwiGLU hidden width F
    rope_theta: float = 100000.0  # RoPE base frequency
    rms_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # output head reuses the token embedding matrix
    max_seq_len: int = 8192  # longest position the model was trained for
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_layer_map(n_drafter_layers: int, n_primary_layers: int) -> tuple[int, ...]:
    """The paper's uniform spread l(j) = round((j+1) * L_L / L_S), 1-indexed primary layers (docs/design.md, Method).

    Args:
        n_drafter_layers: L_S.
        n_primary_layers: L_L.

    Returns:
        A tuple of L_S primary layer indices in 1..L_L; the last drafter layer reads the last primary layer.
    """
    return tuple(
        max(1, min(n_primary_layers, int((j + 1) * n_primary_layers / n_drafter_layers + 0.5)))
        for j in range(n_drafter_layers)
    )


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Shape of a drafter. With `tandem=True` it reads the primary's representations, in one of two forms (`reads`):

    "layers" (the paper's form): attention at drafter layer j (0-indexed) takes keys/values for positions the primary
    has processed from `proj[j] @ h_primary[layer_map[j]]`, and from the drafter's own residual stream for the
    positions the primary has not processed yet (docs/design.md, Method).

    "features" (the feature-level form): the drafter's input at position i is its token's embedding plus one product
    of the primary's states at position i - 1 (the layers in `feature_layers`, concatenated); where the primary has
    not processed position i - 1 yet (inside a drafting round) the drafter's own output there takes their place. Its
    keys/values are its own everywhere (docs/design.md, Feature-level drafting).

    With `tandem=False` every position uses the drafter's own states (the vanilla baseline).
    """

    vocab_size: int = 49152  # must equal the primary's
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 768
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    tandem: bool = True  # False: the vanilla drafter, no primary inputs
    primary_d_model: int = 576  # width of the primary's tapped hidden states
    # 1-indexed primary layers feeding each drafter layer; empty = default_layer_map at construction.
    layer_map: tuple[int, ...] = ()
    primary_n_layers: int = 30
    # True: the token embedding is the primary's frozen [V, P] embedding times a trained [P, D] projection, so only
    # the projection is stored (the 49,152-row table would otherwise dominate a small drafter's size).
    shared_embed: bool = False
    # 0: the output head covers the whole vocabulary. N: it covers the N token ids stored with the weights (the
    # training corpus's most frequent); other tokens are never drafted, so verification stays exact.
    head_vocab: int = 0
    reads: str = "layers"  # "layers" or "features" (see above); ignored when tandem is False
    # "features": the primary layers (1-indexed) fused at the input, in this order; empty = the last layer.
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.reads not in ("layers", "features"):
            raise ValueError(f"reads={self.reads!r} must be 'layers' or 'features'")
        if self.reads == "features" and not self.feature_layers:
            object.__setattr__(self, "feature_layers", (self.primary_n_layers,))
        object.__setattr__(self, "feature_layers", tuple(int(x) for x in self.feature_layers))
        if any(not 1 <= x <= self.primary_n_layers for x in self.feature_layers):
            raise ValueError(f"feature_layers {self.feature_layers} must lie in 1..{self.primary_n_layers}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if not 0 <= self.head_vocab <= self.vocab_size:
            raise ValueError(f"head_vocab={self.head_vocab} must lie in [0, vocab_size={self.vocab_size}]")
        if not self.layer_map:
            object.__setattr__(self, "layer_map", default_layer_map(self.n_layers, self.primary_n_layers))
        object.__setattr__(self, "layer_map", tuple(int(x) for x in self.layer_map))
        if len(self.layer_map) != self.n_layers:
            raise ValueError(f"layer_map has {len(self.layer_map)} entries, drafter has {self.n_layers} layers")
        if any(not 1 <= x <= self.primary_n_layers for x in self.layer_map):
            raise ValueError(f"layer_map {self.layer_map} must lie in 1..{self.primary_n_layers}")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def features(self) -> bool:
        """True for a Tandem drafter of the feature-level form."""
        return self.tandem and self.reads == "features"

    @property
    def tapped_layers(self) -> tuple[int, ...]:
        """Distinct primary layers this drafter reads, sorted; the primary returns exactly these."""
        if not self.tandem:
            return ()
        return tuple(sorted(set(self.feature_layers if self.features else self.layer_map)))

    @property
    def tap_index(self) -> tuple[int, ...]:
        """For each drafter layer ("layers") or fused input ("features"), its index into `tapped_layers`."""
        if not self.tandem:
            return ()
        taps = self.tapped_layers
        return tuple(taps.index(x) for x in (self.feature_layers if self.features else self.layer_map))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_map"], d["feature_layers"] = list(self.layer_map), list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrafterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        tuples = ("layer_map", "feature_layers")
        kwargs: dict[str, Any] = {k: (tuple(v) if k in tuples else v) for k, v in d.items() if k in names}
        return cls(**kwargs)


# Temperatures below this are greedy: dividing logits by a tinier one overflows float arithmetic (inf / NaN).
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. temperature < MIN_TEMPERATURE (e.g. 0) means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k truncation
    top_p: float = 1.0  # nucleus mass in (0, 1]
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """How a speculative round drafts."""

    # Defaults: the setting `tandem tune` ranked first for the shipped Tandem drafter on this 2-core CPU with the int8
    # kernel (results/tune/tune_cpu.md; tuned on prompts/tune.jsonl, checked on the benchmark's prompts:
    # docs/performance.md, Speculation settings). With γ_max = 1, τ only matters where a caller raises γ_max; 0.8 is
    # the paper's.
    gamma_max: int = 1  # most tokens drafted per round
    tau: float = 0.8  # keep drafting while the router's confidence >= tau; 0 drafts gamma_max every round
    draft_top_k: int = 16  # the drafter samples from its top-K (renormalised); that truncated q is sent sparse
    # A round speculates at all only if the router's confidence in its first draft reaches tau_first; otherwise it is
    # a plain one-token primary step, which can cost less than a verify of two tokens. 0: always.
    tau_first: float = 0.0
    # Speculation pauses where it does not pay: once a request's rounds keep fewer than `min_accepted` drafts on
    # average (an exponential average, `tandem.decoding.rounds.Pacer`), it runs `pause_steps` primary-only steps
    # without asking the drafter, then tries a round again. 0: never pause.
    min_accepted: float = 0.0
    pause_steps: int = 4
    # Prompt lookup (`tandem.decoding.lookup`): a round whose newest `lookup_ngram` or more tokens occurred earlier in
    # the request takes the tokens that followed them as its drafts (up to γ), with no drafter model call. The
    # shortest n-gram that counts as a match; 0: off. 3: at γ_max 1 it served 9% / 17% of the rounds on the bench /
    # held-out prompts, kept 66% / 81% of their drafts (the drafter: ~45%) and ran 3% / 7% faster than without it
    # (docs/performance.md, Prompt lookup); 2 matched more often but kept only half.
    lookup_ngram: int = 3

    def __post_init__(self) -> None:
        if self.gamma_max < 1:
            raise ValueError(f"gamma_max must be >= 1, got {self.gamma_max}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}")
        if not 0.0 <= self.tau_first <= 1.0:
            raise ValueError(f"tau_first must lie in [0, 1], got {self.tau_first}")
        if not 0.0 <= self.min_accepted <= self.gamma_max:
            raise ValueError(f"min_accepted must lie in [0, gamma_max = {self.gamma_max}], got {self.min_accepted}")
        if self.pause_steps < 1:
            raise ValueError(f"pause_steps must be >= 1, got {self.pause_steps}")
        if self.draft_top_k < 1:
            raise ValueError(f"draft_top_k must be >= 1, got {self.draft_top_k}")
        if self.lookup_ngram < 0:
            raise ValueError(f"lookup_ngram must be >= 0 (0: prompt lookup off), got {self.lookup_ngram}")

    @property
    def first_tau(self) -> float:
        """The confidence a round's first draft needs for the round to speculate: tau_first, or 0 when τ = 0 (the
        router off: every round drafts γ_max)."""
        return self.tau_first if self.tau > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """Continuous batching in the model workers (`tandem.decoding.workers`) and the model services' flags."""

    max_batch: int = 16  # most sessions' calls in one batched model call
    # How long an idle model waits for the calls of live sessions that are due within it (the workers' `_Batcher`).
    # Behind gRPC the next calls of a batch's sessions come back spread over tens of ms; with 2 ms the batches split
    # into two halves that alternated for good (16 streams: mean batch 8.0, 57 tokens/s), with 40 ms they stay whole
    # (mean batch 15.8, 100 tokens/s).
    window_s: float = 0.040


def save_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
