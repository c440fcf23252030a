"""What a run writes: progress lines on stderr, the JSON report (`build_report`), its markdown (`render_markdown`,
what `tandem bench-report` prints) and its plot (`render_plot`, needs matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmark.config import BASELINE, LOSSY_MODES, VIAS, BenchConfig, split_mode
from benchmark.prompts import BenchPrompt
from benchmark.stats import Sample, block_cost_ratios, microservice_tax, mismatches, speedups, summarize

SCHEMA = "tandem-bench/1"


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def jsonable(obj: Any) -> Any:
    """Paths, tuples and other values of an argparse namespace as JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def build_report(
    cfg: BenchConfig,
    prompts: Sequence[BenchPrompt],
    samples: Mapping[tuple[str, str], Sequence[Sequence[Sample]]],
    *,
    block_ms: Mapping[int, float] | None = None,
    block_ms_xla: Mapping[int, float] | None = None,
    drafter_ms: Mapping[str, float] | None = None,
    machine: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    peer_info: Mapping[str, Any] | None = None,
    server_counters: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a run from its samples (pure: no model is touched).

    Args:
        cfg: the run's config.
        prompts: the prompt set.
        samples: (via, mode) -> [i]: the repeats of prompt i.
        block_ms: k -> ms per primary forward of k tokens.
        block_ms_xla: the same with every product in XLA on float32 weights (when the int8 kernel ran; else None).
        drafter_ms: drafter name -> ms per one-token step.
        machine: `machine_info()`.
        args: the command line's arguments.
        peer_info: each peer's `describe()`, by name (`benchmark.config.PEERS`).
        server_counters: the orchestrator's fallback counters over the run.
        extra: more top-level entries.

    Returns:
        A JSON-able dict:
        schema; args; config; machine; peers (name -> its describe(), or null);
        prompts [{prompt, category, prompt_tokens}]; vias;
        results.<via>.<mode>: `summarize`'s figures;
        modes.<mode>: the headline figures — through gRPC when gRPC ran for the mode, else in process — plus `via`;
        in_process.<mode>: the in-process figures (when in process ran);
        speedup.<mode>: headline tokens/s over the primary's through the same via (a peer's: over the in-process
        primary); speedup_by_via.<via>.<mode>;
        identical.<mode>: every prompt's tokens equal the primary's, through every via (the reference: the primary's
        in-process outputs, else its gRPC ones); mismatches.<mode>: [{via, prompt, position, expected, got}], position
        the first token that differs (the tokens before it agree) and expected / got the primary's and the mode's
        token ids there (null: that output had ended);
        consistent_across_vias.<mode>: in-process and gRPC outputs equal (when both ran);
        tax.<mode>: in-process tokens/s ÷ gRPC tokens/s (when both ran);
        block_cost.<k>: ms(k) / ms(1); block_cost_ms.<k>; block_cost_context;
        block_cost_ms_xla.<k>, block_cost_xla.<k>: the same for the primary's XLA float32 twin (or null);
        drafter_step_ms.<name>; drafter_step_ratio.<name>: ÷ the primary's k = 1;
        server_counters: drafter fallbacks and primary failovers the orchestrator counted during the run (or null).
        Keys k are strings (JSON object keys).
    """
    modes = cfg.all_modes
    results: dict[str, dict[str, Any]] = {}
    for (via, mode), per_prompt in samples.items():
        results.setdefault(via, {})[mode] = summarize(per_prompt)
    vias = [v for v in VIAS if v in results]
    results = {v: {m: results[v][m] for m in modes if m in results[v]} for v in vias}

    headline: dict[str, dict[str, Any]] = {}
    for mode in modes:
        for via in ("grpc", "in-process"):
            if mode in results.get(via, {}):
                headline[mode] = {"via": via, **results[via][mode]}
                break

    by_via = {v: speedups({m: r["tokens_per_s"] for m, r in results[v].items()}) for v in vias}
    speedup = {m: by_via[h["via"]].get(m) for m, h in headline.items()}

    ref_via = next((v for v in vias if BASELINE in results[v]), None)
    reference = results[ref_via][BASELINE]["outputs"] if ref_via else None
    identical: dict[str, bool] = {}
    diffs: dict[str, list[dict[str, Any]]] = {}
    for mode in headline:
        found = []
        for via in vias:
            if mode in results[via] and reference is not None:
                found += [{"via": via, **d} for d in mismatches(reference, results[via][mode]["outputs"])]
        identical[mode] = reference is not None and not found
        diffs[mode] = found

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "args": dict(args or {}),
        "config": jsonable(dataclasses.asdict(cfg)),
        "machine": dict(machine or {}),
        "peers": {name: dict(info) for name, info in peer_info.items()} if peer_info else None,
        "prompts": [{"prompt": p.text, "category": p.category, "prompt_tokens": len(p.ids)} for p in prompts],
        "vias": vias,
        "results": results,
        "modes": headline,
        "speedup": speedup,
        "speedup_by_via": by_via,
        "identical": identical,
        "mismatches": diffs,
        "tax": {},
        "block_cost": None,
        "block_cost_ms": None,
        "block_cost_xla": None,
        "block_cost_ms_xla": None,
        "block_cost_context": cfg.block_cost_context if block_ms else None,
        "drafter_step_ms": dict(drafter_ms) if drafter_ms else None,
        "drafter_step_ratio": None,
        "server_counters": dict(server_counters) if server_counters is not None else None,
    }
    if "in-process" in results:
        report["in_process"] = results["in-process"]
    if "in-process" in results and "grpc" in results:
        ip, gr = results["in-process"], results["grpc"]
        report["tax"] = microservice_tax(
            {m: r["tokens_per_s"] for m, r in ip.items()}, {m: r["tokens_per_s"] for m, r in gr.items()}
        )
        report["consistent_across_vias"] = {m: ip[m]["outputs"] == gr[m]["outputs"] for m in ip if m in gr}
    if block_ms:
        report["block_cost_ms"] = {str(k): v for k, v in sorted(block_ms.items())}
        report["block_cost"] = {str(k): v for k, v in block_cost_ratios(block_ms).items()}
        if block_ms_xla:
            report["block_cost_ms_xla"] = {str(k): v for k, v in sorted(block_ms_xla.items())}
            report["block_cost_xla"] = {str(k): v for k, v in block_cost_ratios(block_ms_xla).items()}
        if drafter_ms:
            report["drafter_step_ratio"] = {name: ms / block_ms[1] for name, ms in drafter_ms.items()}
    report.update(extra or {})
    return report


def identity_warnings(report: Mapping[str, Any]) -> list[str]:
    """One line per mode whose outputs differ from the primary's (lossless modes first; standalone Tandem noted)."""
    lines = []
    n = len(report.get("prompts", []))
    for mode, same in report.get("identical", {}).items():
        if same:
            continue
        found = report.get("mismatches", {}).get(mode, [])
        where = ", ".join(_where(mode, d) for d in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        prompts = len({d["prompt"] for d in found})
        if split_mode(mode)[0] in LOSSY_MODES:
            lines.append(f"note: {mode} (standalone, unverified by design) differs from primary on {prompts}/{n}")
        else:
            first = min(d["position"] for d in found)
            lines.append(
                f"WARNING: {mode} is NOT identical to primary on {prompts}/{n} prompts, the earliest from token "
                f"{first}: {where}{more}"
            )
    lines.sort(key=lambda s: not s.startswith("WARNING"))
    for key, value in (report.get("server_counters") or {}).items():
        if value:
            lines.append(f"WARNING: the orchestrator counted {value:g} {key} during the run (degraded requests)")
    return lines


def _where(mode: str, d: Mapping[str, Any]) -> str:
    """One mismatch: the prompt, via and first differing token, with both token ids when the report has them."""
    text = f"prompt {d['prompt'] + 1} ({d['via']}) at token {d['position']}"
    if "expected" in d:  # reports written before the token ids were recorded have positions only

        def tok(t: int | None) -> str:
            return "end" if t is None else str(t)

        text += f" (primary {tok(d['expected'])}, {mode} {tok(d['got'])})"
    return text


def _f(x: float | None, fmt: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return "–" if x is None else f"{x * scale:{fmt}}{suffix}"


def commit_label(machine: Mapping[str, Any]) -> str:
    """The run's git commit, short, marked when the tree was dirty ("?" when unknown)."""
    commit = (machine.get("git_commit") or "")[:10] + (" (dirty)" if machine.get("git_dirty") else "")
    return commit or "?"


def machine_line(machine: Mapping[str, Any]) -> str:
    """`machine_info()` as one markdown sentence."""
    m = machine
    kernel = m.get("int8_kernel")
    products = "" if kernel is None else ", int8 kernel on" if kernel else ", int8 kernel off (XLA float32 products)"
    return (
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_affinity') or m.get('cpu_count')} cores usable "
        f"({m.get('cpu_count')} online), {m.get('ram_gib')} GiB RAM, Python {m.get('python')}, JAX {m.get('jax')}"
        f"{products}."
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: the main table, the microservice tax, acceptance per position, the block-cost curve
    and the drafter step, identity warnings and the machine."""
    m = report.get("machine", {})
    cfg = report.get("config", {})
    n = len(report.get("prompts", []))
    out = [
        f"Benchmark ({m.get('date', '?')}, commit {commit_label(m)}): {n} prompts × {cfg.get('max_tokens')} tokens, "
        f"greedy, batch 1, γ_max = {cfg.get('gamma_max')}, τ = {cfg.get('tau')}, "
        f"τ_first = {cfg.get('tau_first', 0)}, repeats = {cfg.get('repeats')}.",
        machine_line(m),
        "",
        "| mode | via | tok/s | speedup | TTFT median / p90 (ms) | TPOT median (ms) | accept length | accept rate "
        "| primary calls/token | drafter calls/token | identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    results = report.get("results", {})
    identical = report.get("identical", {})
    by_via = report.get("speedup_by_via", {})
    for mode in report.get("modes", {}):
        for via in VIAS:
            r = results.get(via, {}).get(mode)
            if r is None:
                continue
            ttft = f"{_f(r['ttft_s_median'], '.0f', 1000)} / {_f(r['ttft_s_p90'], '.0f', 1000)}"
            same = identical.get(mode)
            mark = "✓" if same else ("✗ (by design)" if split_mode(mode)[0] in LOSSY_MODES else "**✗**")
            out.append(
                f"| {mode} | {via} | {_f(r['tokens_per_s'])} | {_f(by_via.get(via, {}).get(mode), '.2f', suffix='×')} "
                f"| {ttft} | {_f(r['tpot_s_median'], '.1f', 1000)} | {_f(r['mean_acceptance_length'], '.2f')} "
                f"| {_f(r['acceptance_rate'], '.0%')} | {_f(r['primary_calls_per_token'], '.2f')} "
                f"| {_f(r['drafter_calls_per_token'], '.2f')} | {mark} |"
            )
    out.append("")
    out.append(
        "Speedup: tokens/s over `primary` through the same via (peer modes: over the in-process primary). "
        "tok/s: median over prompts of output tokens / end-to-end latency, measured by the client."
        + (
            " A mode named MODE@τ_first:τ:γ_max[:min_accepted[:lookup_ngram]] ran with those settings instead of the "
            "run's."
            if any(split_mode(m)[1] for m in report.get("modes", {}))
            else ""
        )
    )
    tax = report.get("tax") or {}
    if tax:
        out += ["", "| mode | in-process tok/s | gRPC tok/s | microservice tax |", "|---|---:|---:|---:|"]
        for mode, t in tax.items():
            ip, gr = results["in-process"][mode], results["grpc"][mode]
            out.append(f"| {mode} | {_f(ip['tokens_per_s'])} | {_f(gr['tokens_per_s'])} | {_f(t, '.2f', suffix='×')} |")
    overhead_rows = [
        (mode, via, r)
        for mode in report.get("modes", {})
        for via in VIAS
        if (r := results.get(via, {}).get(mode)) and r.get("overhead") is not None
    ]
    if overhead_rows:
        out += [
            "",
            "Orchestration overhead: the share of the client's end-to-end time spent outside the model workers' "
            "batched calls (request loop, batching hand-off and, through gRPC, serialization and transport).",
            "",
            "| mode | via | model time (s) | end-to-end (s) | overhead |",
            "|---|---|---:|---:|---:|",
        ]
        for mode, via, r in overhead_rows:
            e2el = _f(sum(p["e2el_s"] for p in r["per_prompt"]), ".2f")
            out.append(f"| {mode} | {via} | {_f(r['model_s'], '.2f')} | {e2el} | {_f(r['overhead'], '.1%')} |")
    pos_rows = [
        (mode, via, r["acceptance_per_position"])
        for mode in report.get("modes", {})
        for via in VIAS
        if (r := results.get(via, {}).get(mode)) and r.get("acceptance_per_position")
    ]
    if pos_rows:
        width = max(len(p) for _, _, p in pos_rows)
        out += [
            "",
            "Acceptance per draft position (rounds accepting draft j ÷ rounds):",
            "",
            "| mode | via | " + " | ".join(str(j + 1) for j in range(width)) + " |",
            "|---|---|" + "---:|" * width,
        ]
        for mode, via, p in pos_rows:
            cells = [_f(x, ".2f") for x in p] + [""] * (width - len(p))
            out.append(f"| {mode} | {via} | " + " | ".join(cells) + " |")
    lookup_rows = [
        (mode, via, r)
        for mode in report.get("modes", {})
        for via in VIAS
        if (r := results.get(via, {}).get(mode)) and r.get("lookup_rounds")
    ]
    if lookup_rows:
        out += [
            "",
            "Prompt lookup: the rounds whose drafts came from the request's own tokens (no drafter model call), of "
            "all rounds; their drafts kept.",
            "",
            "| mode | via | lookup rounds | of rounds | drafts per lookup round | lookup accept rate |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for mode, via, r in lookup_rows:
            n, drafted, kept = r["lookup_rounds"], r["lookup_drafted_tokens"] or 0, r["lookup_accepted_tokens"] or 0
            out.append(
                f"| {mode} | {via} | {n} | {_f(n / r['rounds'] if r['rounds'] else None, '.0%')} "
                f"| {_f(drafted / n, '.2f')} | {_f(kept / drafted if drafted else None, '.0%')} |"
            )
    block_ms, block = report.get("block_cost_ms"), report.get("block_cost")
    if block_ms and block:
        ks = list(block_ms)
        out += [
            "",
            f"Primary block cost: one `PrimaryRunner.forward` of k tokens after {report.get('block_cost_context')} "
            "cached tokens (median; blocks are padded to a power of two).",
            "",
            "| k | " + " | ".join(ks) + " |",
            "|---|" + "---:|" * len(ks),
            "| ms | " + " | ".join(_f(block_ms[k], ".1f") for k in ks) + " |",
            "| ÷ k=1 | " + " | ".join(_f(block[k], ".2f") for k in ks) + " |",
        ]
        xla_ms, xla = report.get("block_cost_ms_xla"), report.get("block_cost_xla")
        if xla_ms and xla:
            out += [
                "| ms, XLA float32 products | " + " | ".join(_f(xla_ms.get(k), ".1f") for k in ks) + " |",
                "| ÷ k=1 (XLA) | " + " | ".join(_f(xla.get(k), ".2f") for k in ks) + " |",
                "",
                "The first rows run the primary's products of up to 8 tokens in the int8 kernel "
                "(`tandem.model.kernels`); the XLA rows are the same weights with every product in XLA, timed in the "
                "same interleaving.",
            ]
    drafter_ms, drafter_ratio = report.get("drafter_step_ms"), report.get("drafter_step_ratio") or {}
    if drafter_ms:
        out += ["", "| drafter | ms per 1-token step | ÷ primary k=1 |", "|---|---:|---:|"]
        for name, ms in drafter_ms.items():
            out.append(f"| {name} | {_f(ms, '.2f')} | {_f(drafter_ratio.get(name), '.3f')} |")
    peers = report.get("peers") or {}
    for name, info in peers.items():
        out += ["", f"Peer {name}: " + ", ".join(f"{k} = {v}" for k, v in info.items())]
    if report.get("peer"):  # reports written before peers were named: one unnamed peer
        out += ["", "Peer: " + ", ".join(f"{k} = {v}" for k, v in report["peer"].items())]
    warnings = identity_warnings(report)
    if warnings:
        out += ["", *[f"> {w}" for w in warnings]]
    return "\n".join(out) + "\n"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display).

    Raises:
        SystemExit: matplotlib is not installed (pip install '.[bench]').
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install '.[bench]'") from None
    return plt


def save_figure(plt: Any, fig: Any, tool: str, machine: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Titles a figure with the tool and the machine (`machine_info()`), writes it as a PNG and closes it."""
    fig.suptitle(f"{tool} — {machine.get('cpu', '')} ({machine.get('date', '')})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_plot(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG: tokens/s per mode (in-process and gRPC bars), and the primary's block-cost curve.

    Raises:
        SystemExit: matplotlib is not installed (pip install '.[bench]').
    """
    plt = pyplot()
    results = report.get("results", {})
    modes = list(report.get("modes", {}))
    vias = [v for v in VIAS if v in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(vias))
    for j, via in enumerate(vias):
        xs = [i + (j - (len(vias) - 1) / 2) * width for i in range(len(modes))]
        ran = [(x, results[via][m]["tokens_per_s"]) for x, m in zip(xs, modes, strict=True) if m in results[via]]
        bars = ax1.bar([x for x, _ in ran], [y or 0.0 for _, y in ran], width, label=via)  # a peer runs in process only
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(range(len(modes)), modes, rotation=15, ha="right")
    ax1.set_ylim(0, 1.25 * max([ax1.get_ylim()[1], 1e-9]))  # headroom for the legend above the bars
    ax1.set_ylabel("tokens/s (median over prompts)")
    cfg = report.get("config", {})
    ax1.set_title(f"{len(report.get('prompts', []))} prompts × {cfg.get('max_tokens')} tokens, greedy, batch 1")
    ax1.legend(loc="upper left", ncols=max(1, len(vias)))
    block_ms = report.get("block_cost_ms")
    if block_ms:
        ks = [int(k) for k in block_ms]
        xla_ms = report.get("block_cost_ms_xla")
        ax2.plot(ks, [block_ms[str(k)] for k in ks], marker="o", label="as served")
        if xla_ms:
            ax2.plot(ks, [xla_ms[str(k)] for k in ks], marker="s", label="XLA float32 products")
            ax2.legend(loc="upper left")
        ax2.set_xticks(ks)
        ax2.set_xlabel("k (tokens per primary forward)")
        ax2.set_ylabel("ms per forward")
        ax2.set_title(f"primary block cost after {report.get('block_cost_context')} tokens")
        ax2.grid(alpha=0.3)
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "no block-cost curve in this report", ha="center", va="center")
    return save_figure(plt, fig, "tandem bench", report.get("machine", {}), path)


def write_outputs(
    report: Mapping[str, Any],
    *,
    json_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    markdown: Callable[[Mapping[str, Any]], str] = render_markdown,
    plot: Callable[[Mapping[str, Any], str | os.PathLike[str]], object] = render_plot,
) -> str:
    """Writes the JSON, markdown and PNG that were asked for; returns the markdown.

    `markdown` and `plot` render the report (default: a bench report's; `tandem loadtest` passes its own).
    """
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    text = markdown(report)
    if markdown_path is not None:
        Path(markdown_path).write_text(text, encoding="utf-8")
    if plot_path is not None:
        plot(report, plot_path)
    return text
