"""`tandem tune`: the speculation settings (τ_first, τ, γ_max) that a cost model of this machine favours.

Greedy SPEED is replayed exactly on the primary's own greedy answers to a prompt set (`evaluate.simulate_greedy_speed`,
the replay `tandem eval` uses, checked against the engine in tests/unit/test_train.py), and each setting's rounds are
priced with costs measured here, relative to a one-token primary step: the primary's verify of k tokens
(`costs.measure_block_cost`) and one drafter step (`costs.measure_drafter_step`). A setting's figure is
`RoundCosts.relative_speed`: tokens per unit of time over the primary alone's, at batch 1. The model leaves out what the
settings do not change (the prefill, the request loop, gRPC), so it ranks settings; `tandem bench` measures them. Tune
on prompts the benchmark does not use (prompts/tune.jsonl).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tandem.config import SpecConfig
from tandem.decoding.bundle import BundleConfig, load_bundle
from tandem.decoding.costs import measure_block_cost, measure_drafter_step
from tandem.formats.tokenizer import chat_prompt_ids
from tandem.model.router import MLPRouter
from tandem.training.evaluate import Drafter, RoundCosts, replay, round_predictions


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """What `tune` replays and which settings it tries.

    Attributes:
        max_tokens: greedy tokens the primary answers each prompt with (the replayed requests).
        context: cached tokens before the cost measurements.
        tau_firsts, taus, gammas: the grid of τ_first, τ and γ_max.
        calls: timed calls per cost measurement (median).
        max_len: the models' context.
        batch: rows per drafter forward in the replay.
    """

    max_tokens: int = 128
    context: int = 128
    tau_firsts: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6)
    taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    gammas: tuple[int, ...] = (1, 2, 3, 4, 7)
    calls: int = 9
    max_len: int = 512
    batch: int = 8


def rank_settings(
    preds: np.ndarray,
    conf: np.ndarray,
    seqs: np.ndarray,
    starts: Sequence[int],
    ends: Sequence[int],
    costs: RoundCosts,
    cfg: TuneConfig,
) -> list[dict[str, Any]]:
    """Every setting of the grid replayed over every row and priced, fastest first.

    Args:
        preds, conf: [B, T, G] from `round_predictions` (G >= every γ_max of the grid).
        seqs: [B, T] prompt + the primary's greedy answer per row (zero-padded).
        starts, ends: per row, the prompt's length and the answer's end.
        costs: the machine's cost model.
        cfg: the grid.
    """
    ranked = []
    for tau_first, tau, gamma in itertools.product(cfg.tau_firsts, cfg.taus, cfg.gammas):
        first_tau = SpecConfig(gamma_max=gamma, tau=tau, tau_first=tau_first).first_tau
        total = replay(preds, conf, seqs, starts, ends, gamma, tau, first_tau)
        ranked.append(
            {
                "tau_first": tau_first,
                "tau": tau,
                "gamma_max": gamma,
                "relative_speed": costs.relative_speed(total),
                "mean_acceptance_length": total.mean_acceptance_length,
                "rounds": total.rounds,
                "declined": total.declined,
            }
        )
    return sorted(ranked, key=lambda r: -r["relative_speed"])


def tune(
    rows: Sequence[tuple[str, str]],
    cfg: TuneConfig = TuneConfig(),
    bundle_cfg: BundleConfig = BundleConfig(),
    log: Callable[[str], None] = log_stderr,
    machine_info: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """`tandem tune`: measures the costs, replays both drafters on the prompts and ranks the grid.

    Args:
        rows: (prompt, category) pairs, sent as chat like `tandem bench` sends them.
        cfg: grid and sizes.
        bundle_cfg: which models (its max_len is replaced by cfg.max_len).
        log: progress lines.
        machine_info: describes the machine for the report (the command line passes the benchmark's
            `benchmark.machine.machine_info`); None: no description.

    Returns:
        The JSON `tandem tune` writes: config, machine, measured costs, and per drafter the ranked settings and the
        default's.
    """
    bundle = load_bundle(dataclasses.replace(bundle_cfg, max_len=cfg.max_len))
    engine = bundle.engine
    block_ms = measure_block_cost(engine.primary, context=cfg.context, max_k=max(cfg.gammas) + 1, calls=cfg.calls)
    verify = tuple(block_ms[k] / block_ms[1] for k in sorted(block_ms))
    log(f"primary verify ÷ one token after {cfg.context} tokens: {', '.join(f'{v:.2f}' for v in verify)}")
    prompts = [chat_prompt_ids(bundle.tokenizer, text) for text, _ in rows]
    answers = [engine.generate(ids, mode="primary", max_tokens=cfg.max_tokens).token_ids for ids in prompts]
    starts = [len(ids) for ids in prompts]
    ends = [s + len(a) for s, a in zip(starts, answers, strict=True)]
    seqs = np.zeros((len(prompts), max(ends)), np.int32)
    for b, (ids, a) in enumerate(zip(prompts, answers, strict=True)):
        seqs[b, : ends[b]] = [*ids, *a]
    log(f"replaying {sum(len(a) for a in answers)} primary tokens over {len(prompts)} prompts")
    default = SpecConfig()
    report: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "machine": dict(machine_info()) if machine_info is not None else {},
        "block_cost_ms": block_ms,
        "default": {"tau_first": default.tau_first, "tau": default.tau, "gamma_max": default.gamma_max},
        "drafters": {},
    }
    for name, key in (("tandem", "tandem-speed"), ("vanilla", "speed")):
        worker = engine.drafters[key]
        if worker is None:
            continue
        step_ms = measure_drafter_step(worker.runner, context=cfg.context, calls=cfg.calls)
        costs = RoundCosts(verify, step_ms / block_ms[1])
        router = worker.router if isinstance(worker.router, MLPRouter) else None
        drafter = Drafter(
            worker.runner.cfg,
            worker.runner.params,
            router_params=None if router is None else router.device_params,
            router_cfg=None if router is None else router.cfg,
        )
        preds, conf = round_predictions(
            bundle.primary_config, engine.primary.params, drafter, seqs, max(cfg.gammas), cfg.batch
        )
        ranked = rank_settings(preds, conf, seqs, starts, ends, costs, cfg)
        at_default = [
            r
            for r in ranked
            if (r["tau_first"], r["tau"], r["gamma_max"]) == (default.tau_first, default.tau, default.gamma_max)
        ]
        report["drafters"][name] = {
            "drafter_step_ms": step_ms,
            "drafter_step_relative": costs.drafter_step,
            "settings": ranked,
            "default": at_default[0] if at_default else None,
        }
        best = ranked[0]
        log(
            f"{name}: best τ_first={best['tau_first']} τ={best['tau']} γ_max={best['gamma_max']}: "
            f"{best['relative_speed']:.3f}x the primary alone (model)"
        )
    return report


def render_markdown(report: dict[str, Any], top: int = 8) -> str:
    """The best settings per drafter and the default's, as markdown tables."""
    block_ms = report["block_cost_ms"]  # keys are strings once read back from JSON
    one = block_ms[min(block_ms, key=int)]
    out = [
        "Primary verify of k tokens ÷ one token: "
        + ", ".join(f"k={k}: {float(v) / one:.2f}" for k, v in sorted(block_ms.items(), key=lambda kv: int(kv[0]))),
        "",
    ]
    for name, d in report["drafters"].items():
        out += [
            f"**{name}** (drafter step {d['drafter_step_ms']:.2f} ms = {d['drafter_step_relative']:.3f} of a primary "
            "step)",
            "",
            "| τ_first | τ | γ_max | modelled speed over primary | accept length | rounds | declined |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        shown = d["settings"][:top]
        rows = shown + ([d["default"]] if d["default"] and d["default"] not in shown else [])
        for r in rows:
            mark = " (default)" if r == d["default"] else ""
            out.append(
                f"| {r['tau_first']}{mark} | {r['tau']} | {r['gamma_max']} | {r['relative_speed']:.3f} | "
                f"{r['mean_acceptance_length']:.2f} | {r['rounds']} | {r['declined']} |"
            )
        out.append("")
    return "\n".join(out)
