"""Whether speculation pays on this server: learned from its own requests' output rates at load 1.

A speculative round costs a drafter call, a block verify and one more round trip; it pays only if the drafts it keeps
make up for that, and how the two compare depends on the host: on a CPU whose per-call cost is high, the shipped
drafters (about half of the one-token drafts kept) can lose to the primary alone, and on another host they win.
Rather than a threshold measured once somewhere, the orchestrator measures both on its own traffic: the seconds per
output token of the speculative requests it let speculate and of those it ran primary-only, each while their primary
replica held no other session, so that both samples come from the same requests' population (primary-mode requests,
whose prompts may differ, are not counted). A new speculative request at that load runs primary-only (losslessly,
as a load-shed one) while that has been the faster; one in `explore_every` decisions goes the other way, so
both rates stay current as traffic and load change.

Decisions depend on measured times, so a request's path may differ from run to run; greedy output cannot (the verify
is lossless), and seeded sampled requests are never redirected (their draws follow the rounds they run, and the same
seed gives the same tokens in process and through the services). JAX-free and thread-safe.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable

from tandem.config import SPECULATIVE_MODES, SamplingParams, SpecConfig
from tandem.decoding.rounds import GenerationStats


@dataclasses.dataclass(frozen=True)
class PayoffConfig:
    """How the orchestrator learns whether speculation pays alone (see the module docstring)."""

    enabled: bool = True
    explore_every: int = 8  # one decision in this many takes the other path (a fresh sample of its rate)
    weight: float = 0.25  # of the latest request in each exponential average of seconds per token
    min_tokens: int = 8  # shorter requests are not measured (their prefill dominates)

    def __post_init__(self) -> None:
        if self.explore_every < 2 or not 0 < self.weight <= 1 or self.min_tokens < 1:
            raise ValueError(f"need explore_every >= 2, 0 < weight <= 1 and min_tokens >= 1, got {self}")


def payoff_key(mode: str, sampling: SamplingParams, spec: SpecConfig, speculated: bool) -> Hashable:
    """What a request's rate is averaged with: its mode, speculation settings and whether it samples, and the path it
    ran (speculative rounds, or primary-only)."""
    return mode, sampling.greedy, spec, speculated


class SpeculationPayoff:
    """Server-wide exponential averages of seconds per output token per mode, settings, sampling and path."""

    def __init__(self, cfg: PayoffConfig = PayoffConfig()) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._rate: dict[Hashable, float] = {}  # key -> seconds per output token
        self._decisions: dict[Hashable, int] = {}  # key -> decisions made for it so far

    def rate(self, key: Hashable) -> float | None:
        """The current average seconds per output token of `key`'s requests (None: none measured yet)."""
        with self._lock:
            return self._rate.get(key)

    def speculate(self, mode: str, sampling: SamplingParams, spec: SpecConfig) -> bool:
        """Whether a new request of a speculative mode, at a load where speculation is allowed, should draft.

        Unmeasured paths are tried first (speculation, then the primary alone); after that the faster path wins,
        except on every explore_every-th decision. Always True when disabled and for seeded sampled requests.
        """
        if not self.cfg.enabled or (not sampling.greedy and sampling.seed is not None):
            return True
        key = payoff_key(mode, sampling, spec, True)
        with self._lock:
            n = self._decisions[key] = self._decisions.get(key, 0) + 1
            spec_rate, plain_rate = self._rate.get(key), self._rate.get(payoff_key(mode, sampling, spec, False))
        if spec_rate is None:
            return True
        if plain_rate is None:
            return False
        faster = spec_rate <= plain_rate
        return faster != (n % self.cfg.explore_every == 0)

    def observe(
        self, mode: str, sampling: SamplingParams, spec: SpecConfig, stats: GenerationStats, alone: bool
    ) -> None:
        """Takes a finished request's rate if it is a speculative mode's and measured its path cleanly: `alone` (its
        replica held no other session at any step), enough tokens, no failover, and its whole run on one path
        (speculative rounds from the start, or primary-only by this payoff; not a drafter failure or a load shed)."""
        if mode not in SPECULATIVE_MODES or not alone or stats.output_tokens < self.cfg.min_tokens:
            return
        if stats.primary_failovers or stats.drafter_failures or stats.load_shed or stats.elapsed_s <= 0:
            return
        key = payoff_key(mode, sampling, spec, not stats.speculation_skipped)
        seconds = stats.elapsed_s / stats.output_tokens
        with self._lock:
            last = self._rate.get(key)
            self._rate[key] = seconds if last is None else last + self.cfg.weight * (seconds - last)
