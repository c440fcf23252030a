"""Prompt lookup: drafts copied from the request's own tokens, at no model cost.

A small primary repeats itself (lists, code, the phrasing of the question, its own loops), so the tokens that followed
the last time the context's most recent n-gram occurred are often what it writes next. The drafter worker tries this
before its model: when the newest `min_ngram`..`max_ngram` tokens occurred earlier in the request, the tokens after
that occurrence are the round's drafts. Verification stays exact, as for any drafts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class LookupConfig:
    """When a round's drafts come from the request's own tokens."""

    min_ngram: int = 3  # the shortest suffix whose earlier occurrence counts as a match (0: lookup off)
    max_ngram: int = 6  # the longest suffix tried first
    window: int = 1024  # how many of the newest tokens are searched

    def __post_init__(self) -> None:
        if self.min_ngram < 0 or (self.min_ngram and self.max_ngram < self.min_ngram):
            raise ValueError(f"lookup n-grams {self.min_ngram}..{self.max_ngram} are not a range")
        if self.window < 1:
            raise ValueError(f"lookup window {self.window} must be positive")

    @property
    def enabled(self) -> bool:
        return self.min_ngram > 0

    @classmethod
    def shortest(cls, min_ngram: int) -> LookupConfig:
        """A request's lookup (`SpecConfig.lookup_ngram`): n-grams from min_ngram up to the default longest, or
        min_ngram alone when it is longer."""
        return cls(min_ngram=min_ngram, max_ngram=max(min_ngram, cls.max_ngram))


def lookup_drafts(tokens: Sequence[int], n_drafts: int, cfg: LookupConfig = LookupConfig()) -> list[int]:
    """Up to n_drafts tokens that followed the most recent earlier occurrence of the longest matching suffix.

    Args:
        tokens: the request's tokens so far (prompt, then output), the newest last.
        n_drafts: the most drafts wanted.
        cfg: n-gram sizes and search window.

    Returns:
        The drafts (empty when no suffix of at least cfg.min_ngram tokens occurred earlier, or lookup is off).
    """
    if not cfg.enabled or n_drafts < 1:
        return []
    ctx = np.asarray(tokens[-cfg.window :], np.int64)
    for n in range(min(cfg.max_ngram, ctx.size - 1), cfg.min_ngram - 1, -1):
        # every earlier n-gram with at least one token after it, against the newest n tokens
        grams = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)  # [ctx.size - n, n]
        hits = np.flatnonzero((grams == ctx[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the newest occurrence: recent text predicts best
            return ctx[start : start + n_drafts].tolist()
    return []
