"""Load-aware speculation: how many drafts a round may make, and how many primary steps a call may run, at a given
load (running requests per primary replica).
"""

from __future__ import annotations

import dataclasses

from tandem.decoding.rounds import MAX_STEPS


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """Load-aware speculation: the most drafts per round at a given load (running requests per primary replica).

    Speculation pays off least when the primary is busiest, because a batched block verify then costs nearly as much
    per token as the plain step. At or below `full_until` requests, γ is the request's own; from `primary_only_from`
    on, requests run primary-only rounds (the drafter is let go, losslessly); in between γ shrinks linearly.
    """

    # Measured here: with the shipped drafters (about 1.44 tokens per round at γ = 1) a batched verify of drafts does
    # not pay for itself once two requests share the primary. A step of 2 rows × 2 tokens costs ~1.33x 2 rows × 1
    # token, and 3 rows run padded to 4, where 2 tokens a row cost ~1.6x one; the drafter's round comes on top. With
    # speculation down to one draft at 2 and 3 requests, tandem-speed made 0.84x and 0.74x primary's output at 2 and 3
    # streams (results/loadtest/low_concurrency_before_cpu.json); primary-only from 2 on, 1.03x and 0.99x
    # (results/loadtest/low_concurrency_cpu.json).
    full_until: int = 1
    primary_only_from: int = 2
    # From primary_only_from on, a primary-only request runs this many one-token steps per Primary call (multi-step
    # decoding; 1 = off): the same tokens with a fraction of the round trips, whose CPU the model shares on a CPU host.
    multi_step: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.full_until < self.primary_only_from:
            raise ValueError(f"need 0 <= full_until < primary_only_from, got {self}")
        if not 1 <= self.multi_step <= MAX_STEPS:
            raise ValueError(f"multi_step must lie in [1, {MAX_STEPS}], got {self.multi_step}")

    def gamma_cap(self, load: float, gamma_max: int) -> int:
        """The most drafts per round at `load` (0 = primary-only rounds)."""
        if load <= self.full_until:
            return gamma_max
        if load >= self.primary_only_from:
            return 0
        share = (self.primary_only_from - load) / (self.primary_only_from - self.full_until)
        return max(1, round(gamma_max * share))

    def steps(self, load: float) -> int:
        """One-token steps per primary-only call at `load`."""
        return self.multi_step if load >= self.primary_only_from else 1
