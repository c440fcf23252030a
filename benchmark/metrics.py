"""The services' Prometheus metrics, scraped: the model services' busy seconds (orchestration overhead) and the
orchestrator's fallback counters.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

# The orchestrator's counters of degraded requests (Prometheus sample name -> report key).
FALLBACK_COUNTERS = {
    "tandem_drafter_fallbacks_total": "drafter_fallbacks",
    "tandem_primary_failovers_total": "failovers",
}


def fetch_metrics(metrics_url: str, timeout_s: float = 5.0) -> str:
    """The Prometheus text exposition a service serves at `metrics_url`."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
        return str(resp.read().decode("utf-8", "replace"))


def _samples(metrics_url: str, timeout_s: float) -> Iterator[Any]:
    """Every sample of a service's Prometheus exposition, parsed by prometheus_client (as loadtest.metrics does)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(fetch_metrics(metrics_url, timeout_s)):
        yield from family.samples


def _service_gauge(metrics_url: str, suffix: str, timeout_s: float) -> float:
    """A model service's `tandem_*<suffix>` gauges summed."""
    return sum(
        float(s.value)
        for s in _samples(metrics_url, timeout_s)
        if s.name.startswith("tandem_") and s.name.endswith(suffix)
    )


def busy_seconds(metrics_url: str, timeout_s: float = 5.0) -> float:
    """A model service's time spent running model calls so far: its `tandem_*_busy_seconds` gauges summed."""
    return _service_gauge(metrics_url, "_busy_seconds", timeout_s)


def compiled_programs(metrics_url: str, timeout_s: float = 5.0) -> float:
    """The XLA programs a model service has compiled or loaded so far (`tandem_*_compiled_programs`): a rise while
    measuring means a request waited for a compile."""
    return _service_gauge(metrics_url, "_compiled_programs", timeout_s)


def orchestrator_counters(metrics_url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The orchestrator's fallback counters from its Prometheus endpoint (nonzero: some requests ran degraded)."""
    out: dict[str, float] = {}
    for s in _samples(metrics_url, timeout_s):
        if s.name in FALLBACK_COUNTERS:
            key = FALLBACK_COUNTERS[s.name]
            out[key] = out.get(key, 0.0) + float(s.value)
    return out
