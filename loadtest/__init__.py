"""The load-test harness (`tandem loadtest`): virtual users on Ray stream `Generate` calls from the orchestrator at a
given arrival rate and concurrency, and the run is measured as vLLM's `bench serve` measures one (TTFT, TPOT, ITL,
E2EL, throughput, goodput) together with the orchestrator's speculation counters.

    from loadtest import LoadTestConfig, run_loadtest, write_outputs
    report = run_loadtest(LoadTestConfig(num_requests=64, max_concurrency=16), prompts, target="127.0.0.1:50050")
    print(write_outputs(report, json_path="loadtest.json"))

A client like any other: it speaks the public API only. Ray is imported when a test runs (pip install '.[loadtest]').
It shares the benchmark's statistics, metrics scraping, machine description, report helpers and stack launch
(`benchmark`), and only the command line (`apps.cli`) imports it.
"""

from loadtest.harness import (
    LoadTestConfig,
    arrival_gaps,
    chat_prompts,
    ray_session,
    run_loadtest,
    stream_one,
    summarize_repeats,
)
from loadtest.metrics import RequestRecord, metrics_delta, spec_from_records, summarize
from loadtest.report import render_markdown, render_plot, write_outputs

__all__ = [
    "LoadTestConfig",
    "RequestRecord",
    "arrival_gaps",
    "chat_prompts",
    "metrics_delta",
    "ray_session",
    "render_markdown",
    "render_plot",
    "run_loadtest",
    "spec_from_records",
    "stream_one",
    "summarize",
    "summarize_repeats",
    "write_outputs",
]
