"""The orchestrator's Prometheus series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.decoding.rounds import GenerationResult


class Metrics:
    """The orchestrator's Prometheus series (speculation counters named like vLLM's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.drafts = Counter("tandem_spec_num_drafts", "speculative rounds", registry=registry)
        self.draft_tokens = Counter("tandem_spec_num_draft_tokens", "drafted tokens", registry=registry)
        self.accepted_tokens = Counter("tandem_spec_num_accepted_tokens", "accepted drafted tokens", registry=registry)
        self.declined_rounds = Counter(
            "tandem_spec_num_declined_rounds", "rounds the router declined to draft (τ_first)", registry=registry
        )
        self.lookup_rounds = Counter(
            "tandem_spec_num_lookup_rounds", "speculative rounds whose drafts prompt lookup found", registry=registry
        )
        self.lookup_accepted_tokens = Counter(
            "tandem_spec_num_lookup_accepted_tokens", "accepted drafts that prompt lookup found", registry=registry
        )
        self.accepted_per_pos = Counter(
            "tandem_spec_num_accepted_tokens_per_pos", "accepted drafts by position", ["position"], registry=registry
        )
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "TTFT", registry=registry)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "TPOT", registry=registry)
        self.requests = Counter("tandem_requests", "finished requests", ["mode", "finish_reason"], registry=registry)
        self.running = Gauge("tandem_requests_running", "requests in flight", registry=registry)
        self.waiting = Gauge("tandem_requests_waiting", "requests queued for a running place", registry=registry)
        self.rejected = Counter(
            "tandem_requests_rejected", "requests turned away with RESOURCE_EXHAUSTED (admission)", registry=registry
        )
        self.limit = Gauge("tandem_admission_limit", "requests allowed to run at once now", registry=registry)
        self.gamma_cap = Gauge("tandem_load_gamma_cap", "most drafts per round the load allows now", registry=registry)
        self.load_shed = Counter(
            "tandem_load_shed", "requests whose speculation the load ended early", registry=registry
        )
        self.speculation_skipped = Counter(
            "tandem_speculation_skipped",
            "speculative requests run primary-only: the primary alone has been faster here (orchestrator/payoff.py)",
            registry=registry,
        )
        self.payoff_rate = Gauge(
            "tandem_payoff_seconds_per_token",
            "average seconds per output token of lone greedy requests with the default settings, by mode and path",
            ["mode", "path"],
            registry=registry,
        )
        self.drafter_fallbacks = Counter(
            "tandem_drafter_fallbacks",
            "requests finished by the primary alone after a drafter failure",
            registry=registry,
        )
        self.primary_failovers = Counter(
            "tandem_primary_failovers", "requests re-prefilled on another primary replica", registry=registry
        )
        self.endpoints = Gauge("tandem_orchestrator_endpoints", "resolved pods", ["service"], registry=registry)

    def observe(self, result: GenerationResult, finish: str, first_token_s: float) -> None:
        s = result.stats
        self.drafts.inc(s.rounds)
        self.draft_tokens.inc(s.drafted_tokens)
        self.accepted_tokens.inc(s.accepted_tokens)
        self.declined_rounds.inc(s.declined_rounds)
        self.lookup_rounds.inc(s.lookup_rounds)
        self.lookup_accepted_tokens.inc(s.lookup_accepted_tokens)
        for pos, n in enumerate(s.accepted_per_position):
            self.accepted_per_pos.labels(position=str(pos)).inc(n)
        self.ttft.observe(first_token_s)
        if s.output_tokens > 1:
            self.tpot.observe((s.elapsed_s - s.ttft_s) / (s.output_tokens - 1))
        self.requests.labels(mode=result.mode, finish_reason=finish).inc()
        self.drafter_fallbacks.inc(s.drafter_failures)
        self.load_shed.inc(int(s.load_shed))
        self.speculation_skipped.inc(int(s.speculation_skipped))
        self.primary_failovers.inc(s.primary_failovers)
