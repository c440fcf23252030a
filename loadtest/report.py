"""A load-test report (`loadtest.harness.run_loadtest`) as markdown tables and a PNG."""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmark import report as bench_report

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("itl_per_token", "ITL per token"), ("e2el", "E2EL"))


def runs_of(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The report's runs: its sweep, or the one run at its top level."""
    return list(report["sweep"]) if "sweep" in report else [report]


def acceptance_length(run: Mapping[str, Any]) -> float | None:
    """The run's mean acceptance length: the server's counters when scraped, else the final chunks'."""
    spec = run.get("spec") or run.get("spec_responses") or {}
    value: float | None = spec.get("mean_acceptance_length")
    return value


def _primary_only(run: Mapping[str, Any]) -> str:
    """Speculative requests of the run that the server ran primary-only, by the load / by the payoff ("–": not
    scraped, or a primary-mode run)."""
    counts = run.get("primary_only")
    if not counts or run.get("mode") == "primary":
        return "–"
    return f"{counts['load_shed']:g} / {counts['speculation_skipped']:g}"


def _n(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else f"{x:{fmt}}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """One row per run (outcomes, throughputs, latency medians and p99s, acceptance); for a single run also every
    latency's mean / p50 / p90 / p99; then the first errors and the machine."""
    m, cfg = report.get("machine", {}), report.get("config", {})
    rate = cfg.get("rate") or 0
    pacing = f"{rate:g} req/s (gamma arrivals, burstiness {cfg.get('burstiness'):g})" if rate else "all at once"
    slo = ", ".join(
        f"{k} ≤ {v:g} ms" for k, v in (("TTFT", cfg.get("slo_ttft_ms")), ("TPOT", cfg.get("slo_tpot_ms"))) if v
    )
    out = [
        f"Load test ({m.get('date', '?')}, commit {bench_report.commit_label(m)}) of {report.get('target')} "
        f"({report.get('server')}): {cfg.get('num_requests')} requests per run × {cfg.get('max_tokens')} tokens, "
        f"{pacing}, {cfg.get('users')} virtual users on Ray" + (f"; goodput SLO: {slo}" if slo else "") + ".",
        bench_report.machine_line(m),
        "",
        "| mode | max concurrency | completed | rejected | failed | req/s | output tok/s | goodput (req/s) "
        "| TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 (ms) | E2EL p50 (ms) | accept length "
        "| primary-only: load / payoff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = runs_of(report)
    for r in runs:
        out.append(
            f"| {r['mode']} | {r['max_concurrency']} | {r['completed']} | {r['rejected']} | {r['failed']} "
            f"| {_n(r['request_throughput'], '.2f')} | {_n(r['output_throughput'])} | {_n(r['goodput'], '.2f')} "
            f"| {_n(r['ttft']['p50'], '.0f')} / {_n(r['ttft']['p99'], '.0f')} "
            f"| {_n(r['tpot']['p50'])} / {_n(r['tpot']['p99'])} | {_n(r['itl']['p50'])} "
            f"| {_n(r['e2el']['p50'], '.0f')} | {_n(acceptance_length(r), '.2f')} | {_primary_only(r)} |"
        )
    summary = report.get("summary", [])
    if summary and (len(summary) < len(runs) or len({r["mode"] for r in summary}) > 1):
        first = summary[0]["mode"]
        out += [
            "",
            f"| max concurrency | mode | runs | output tok/s, median | each run | ÷ {first} (paired) "
            "| p99 TPOT (ms), median |",
            "|---:|---|---:|---:|---|---:|---:|",
        ]
        for row in summary:
            each = " / ".join(f"{v:.1f}" for v in row["output_throughputs"])
            out.append(
                f"| {row['max_concurrency']} | {row['mode']} | {row['runs']} | {_n(row['output_throughput'])} "
                f"| {each} | {_n(row['ratio_to_first'], '.2f')}{'x' if row['ratio_to_first'] else ''} "
                f"| {_n(row['tpot_p99'])} |"
            )
    if len(runs) == 1:
        out += ["", "| latency (ms) | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
        for key, name in LATENCIES:
            d = runs[0][key]
            out.append(f"| {name} | {_n(d['mean'])} | {_n(d['p50'])} | {_n(d['p90'])} | {_n(d['p99'])} |")
    errors = [(r, e) for r in runs for e in r.get("errors", [])]
    if errors:
        out += ["", *[f"> {r['mode']} at {r['max_concurrency']}: {e}" for r, e in errors]]
    return "\n".join(out) + "\n"


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    xs = sorted(values)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def render_plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG: for one run, the CDFs of TTFT and TPOT; for a sweep, output throughput and p99 TPOT against max
    concurrency, a line per mode (through the medians of repeated runs, each run a dot).

    Raises:
        SystemExit: matplotlib is not installed (pip install '.[bench]').
    """
    plt = bench_report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = runs_of(report)
    if len(runs) == 1:
        rows = runs[0].get("requests", [])
        for ax, key, name in zip(axes, ("ttft_ms", "tpot_ms"), ("TTFT", "TPOT"), strict=True):
            values = [row[key] for row in rows if row[key] is not None]
            if values:
                _cdf(ax, values, runs[0]["mode"])
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{name} CDF, max concurrency {runs[0]['max_concurrency']}")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    else:
        modes = list(dict.fromkeys(r["mode"] for r in runs))
        for ax, name, value in (
            (axes[0], "output tokens/s", lambda r: r["output_throughput"]),
            (axes[1], "p99 TPOT (ms)", lambda r: r["tpot"]["p99"]),
        ):
            for mode in modes:
                mine = [r for r in runs if r["mode"] == mode and value(r) is not None]
                concurrencies = list(dict.fromkeys(r["max_concurrency"] for r in mine))
                medians = [
                    statistics.median(value(r) for r in mine if r["max_concurrency"] == c) for c in concurrencies
                ]
                line = ax.plot(concurrencies, medians, marker="o", label=mode)[0]
                if len(mine) > len(concurrencies):  # repeats: every run as a dot, the line through their medians
                    ax.scatter(
                        [r["max_concurrency"] for r in mine], [value(r) for r in mine], s=10, color=line.get_color()
                    )
            ax.set_xscale("log", base=2)
            concurrencies = sorted({r["max_concurrency"] for r in runs})
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.set_xlabel("max concurrency")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
    return bench_report.save_figure(plt, fig, "tandem loadtest", report.get("machine", {}), path)


def write_outputs(
    report: Mapping[str, Any],
    *,
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
) -> str:
    """Writes the JSON, markdown and PNG that were asked for; returns the markdown."""
    return bench_report.write_outputs(
        report,
        json_path=json_path,
        markdown_path=markdown_path,
        plot_path=plot_path,
        markdown=render_markdown,
        plot=render_plot,
    )
