"""The orchestrator's settings (what `orchestrator.server` builds from its flags)."""

from __future__ import annotations

import dataclasses

from orchestrator.load import LoadPolicy
from orchestrator.payoff import PayoffConfig
from tandem.config import SpecConfig
from tandemrpc.security import TlsFiles


@dataclasses.dataclass(frozen=True)
class OrchestratorConfig:
    primary_target: str = "127.0.0.1:50051"  # HOST:PORT, a comma-separated list, or dns:///HOST:PORT (routing.py)
    secondary_target: str = "127.0.0.1:50052"
    resolve_interval_s: float = 5.0  # how often dns:/// targets are re-resolved
    tls: TlsFiles | None = None  # with a CA: TLS to the model services, presenting cert/key (mutual TLS)
    vocab_size: int = 49152  # the primary's
    max_len: int = 2048  # the model services' positions per session
    max_tokens_limit: int = 1024  # most tokens one request may ask for
    gamma_max_limit: int = 16  # most drafts per round a request may ask for
    default_spec: SpecConfig = SpecConfig()
    call_timeout_s: float = 60.0  # per model-service call
    max_running: int = 16  # requests running rounds at once (per orchestrator); match the model services' slots
    max_queued: int = 16  # requests waiting for a running place; beyond it requests get RESOURCE_EXHAUSTED
    queue_timeout_s: float = 10.0  # a queued request gives up (RESOURCE_EXHAUSTED) after waiting this long
    tpot_target_ms: float | None = None  # adapt the running limit to keep time per output token near this (None: off)
    load: LoadPolicy = LoadPolicy()  # how γ shrinks as the primary's batch fills
    payoff: PayoffConfig = PayoffConfig()  # run speculative requests primary-only at load 1 where that is faster
