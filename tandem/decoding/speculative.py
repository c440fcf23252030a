"""Speculative decoding math on the host: target distributions, sparse proposals, verification, τ stopping.

Everything here is NumPy on one request's rows, so the engine and the services share it and tests can check it
exactly. Conventions:
    * A round drafts k tokens d_1..d_k after the pending token t_0. The primary scores [t_0, d_1..d_k] in one block
      pass, giving k + 1 target rows: row i is the primary's distribution for the token after position i, so row i-1
      judges d_i and row k yields the bonus token when all drafts are accepted.
    * Greedy requests compare token ids only; sampled requests use the standard speculative rejection rule with the
      drafter's truncated distribution q as the proposal (docs/design.md, Method: q is sent sparse, K ids + K
      probabilities).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tandem.config import SamplingParams


def make_rng(seed: int | None) -> np.random.Generator:
    """A request's random generator: reproducible when seeded."""
    return np.random.default_rng(seed)


def request_rngs(seed: int | None) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (primary, drafter) generators for one request.

    The primary (verification, its own sampling) and the drafter (drawing drafts) may run in different processes;
    each derives its own stream from the request's seed, so a seeded request gives the same tokens in process and
    through the services.
    """
    primary, drafter = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(primary), np.random.default_rng(drafter)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a request samples from: temperature, then top-k, then top-p.

    Args:
        logits: [..., V] raw logits.
        params: the request's sampling parameters; greedy gives a one-hot on the argmax.

    Returns:
        [..., V] float64 probabilities.
    """
    if params.greedy:
        out = np.zeros(logits.shape, dtype=np.float64)
        np.put_along_axis(out, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return out
    probs = softmax(logits / params.temperature)
    vocab = probs.shape[-1]
    if 0 < params.top_k < vocab or params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # [..., V] descending
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep = np.ones(sorted_p.shape, dtype=bool)
        if 0 < params.top_k < vocab:
            keep[..., params.top_k :] = False
        if params.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
            before = np.cumsum(sorted_p, axis=-1) - sorted_p
            keep &= before < params.top_p
        mask = np.zeros(probs.shape, dtype=bool)
        np.put_along_axis(mask, order, keep, axis=-1)
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


@dataclasses.dataclass(frozen=True)
class SparseDist:
    """A distribution with support on K tokens: the drafter's proposal q for one position."""

    ids: np.ndarray  # [K] int64 token ids
    probs: np.ndarray  # [K] float64, sums to 1

    def __repr__(self) -> str:
        return f"SparseDist(K={self.ids.shape[0]}, top={int(self.ids[0])}:{float(self.probs[0]):.3f})"

    def prob_of(self, token: int) -> float:
        hit = np.nonzero(self.ids == token)[0]
        return float(self.probs[hit[0]]) if hit.size else 0.0


def truncate_top_k(probs: np.ndarray, k: int) -> SparseDist:
    """Keeps the k most probable tokens of a [V] distribution and renormalises (ties broken by lower id)."""
    k = min(k, probs.shape[-1])
    ids = np.argsort(-probs, kind="stable")[:k]
    p = probs[ids]
    nonzero = p > 0
    ids, p = ids[nonzero], p[nonzero]
    return SparseDist(ids=ids.astype(np.int64), probs=p / p.sum())


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a [V] distribution by inverse CDF (one uniform per draw keeps seeded runs aligned)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.shape[-1] - 1))


def sample_sparse(q: SparseDist, rng: np.random.Generator) -> int:
    return int(q.ids[sample(q.probs, rng)])


def proposal(draft_logits: np.ndarray, params: SamplingParams, draft_top_k: int) -> SparseDist:
    """The drafter's proposal q for one position: the request's processing, truncated to the top K.

    Greedy requests get the one-token distribution on the drafter's argmax.
    """
    if params.greedy:
        return SparseDist(ids=np.array([int(np.argmax(draft_logits))]), probs=np.ones(1))
    return truncate_top_k(target_probs(draft_logits, params), draft_top_k)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What verification decided: the first `accepted` drafts stand and `next_token` follows them."""

    accepted: int
    next_token: int


def verify_greedy(drafts: list[int], best: Sequence[int] | np.ndarray) -> Verdict:
    """Accepts the longest prefix of drafts that equals the primary's argmax.

    Args:
        drafts: d_1..d_k.
        best: [k + 1] the primary's argmax tokens after t_0, d_1, .., d_k.

    Returns:
        The verdict; next_token is the primary's argmax after the last accepted token (correction or bonus).
    """
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == int(best[accepted]):
        accepted += 1
    return Verdict(accepted, int(best[accepted]))


def verify_sampled(
    drafts: list[int], proposals: list[SparseDist], target: np.ndarray, rng: np.random.Generator
) -> Verdict:
    """Speculative rejection sampling: the output is distributed exactly as sampling from `target` row by row.

    Draft d_i (drawn from q_i) is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
    next token is drawn from the residual norm(max(0, p_i - q_i)); if all k drafts stand, the bonus token is drawn
    from p_{k+1}.

    Args:
        drafts: d_1..d_k.
        proposals: q_1..q_k, the sparse distributions the drafts were sampled from.
        target: [k + 1, V] the request's processed target distributions (see `target_probs`).
        rng: the request's generator.

    Returns:
        The verdict.
    """
    for i, (d, q) in enumerate(zip(drafts, proposals, strict=True)):
        p_d, q_d = float(target[i, d]), q.prob_of(d)
        if q_d > 0 and rng.random() * q_d < p_d:  # u < p/q without dividing
            continue
        residual = target[i].copy()
        residual[q.ids] -= q.probs
        residual = np.maximum(residual, 0.0)
        if residual.sum() <= 0:  # p == q on the support: any rejection is measure-zero; fall back to p
            residual = target[i]
        return Verdict(i, sample(residual, rng))
    return Verdict(len(drafts), sample(target[len(drafts)], rng))


class Router(Protocol):
    """Decides after each drafted token whether to keep drafting (confidence >= τ) or verify now.

    A structural type, so the model layer's trained router (`tandem.model.router.MLPRouter`) implements it without
    importing this module; `MaxProbRouter` below is the fallback.
    """

    def confidence(self, draft_logits: np.ndarray) -> float:
        """Estimated chance the primary agrees with the drafter at this position, from its [V] logits."""
        ...


class MaxProbRouter(Router):
    """The paper's fallback without a trained router (docs/design.md, Method): the drafter's own top probability."""

    def confidence(self, draft_logits: np.ndarray) -> float:
        return float(softmax(draft_logits).max())


def keep_drafting(router: Router, draft_logits: np.ndarray, drafted: int, gamma_max: int, tau: float) -> bool:
    """τ stopping: continue while fewer than γ_max tokens are drafted and the router's confidence reaches τ."""
    if drafted >= gamma_max:
        return False
    return tau <= 0.0 or router.confidence(draft_logits) >= tau


def speculates(router: Router, draft_logits: np.ndarray, tau_first: float) -> bool:
    """Whether a round drafts at all: the router's confidence in its first draft reaches τ_first (<= 0: always)."""
    return tau_first <= 0.0 or router.confidence(draft_logits) >= tau_first
