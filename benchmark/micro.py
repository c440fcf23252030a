"""Micro-benchmarks of single model calls for the report: the primary's block-cost curve (beside its XLA float32
twin where the int8 kernel runs) and the drafters' one-token step, measured with `tandem.decoding.costs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from benchmark.config import BenchConfig
from benchmark.report import log_stderr
from tandem.decoding.costs import measure_block_costs, measure_drafter_step

if TYPE_CHECKING:
    from tandem.decoding.engine import Engine
    from tandem.model.primary import PrimaryRunner


def xla_twin(primary: PrimaryRunner) -> PrimaryRunner | None:
    """A runner on the same float32 weights with every product in XLA, when `primary` runs the int8 kernel (else None).

    Shares the weights (no copy); has its own cache of the same shape, so the same compiled paths are measured.
    """
    from tandem.model import kernels
    from tandem.model.primary import float_only

    if not kernels.available() or primary.params.head_panels is None:
        return None
    return type(primary)(
        primary.cfg, float_only(primary.params), taps=primary.taps, batch=primary.batch, max_len=primary.max_len
    )


def call_costs(
    engine: Engine, cfg: BenchConfig, log: Callable[[str], None] = log_stderr
) -> tuple[dict[int, float], dict[int, float] | None, dict[str, float]]:
    """The block-cost curve as served, the same for the primary's XLA twin (None without the int8 kernel), and each
    drafter's one-token step, all after `cfg.block_cost_context` cached tokens (which must be set)."""
    assert cfg.block_cost_context is not None
    calls = cfg.block_cost_calls
    twin = xla_twin(engine.primary)  # the int8 kernel's baseline, measured in the same interleaving
    costs = measure_block_costs(
        [engine.primary, *([twin] if twin is not None else [])],
        context=cfg.block_cost_context,
        max_k=cfg.block_cost_max_k,
        calls=calls,
    )
    block_ms, block_ms_xla = costs[0], (costs[1] if twin is not None else None)
    del twin
    log(f"block cost after {cfg.block_cost_context} tokens: k=1 {block_ms[1]:.2f} ms")
    drafter_ms = {}
    for name, key in (("tandem", "tandem-speed"), ("vanilla", "speed")):
        worker = engine.drafters.get(key)
        if worker is not None:
            drafter_ms[name] = measure_drafter_step(worker.runner, context=cfg.block_cost_context, calls=calls)
            log(f"{name} drafter step: {drafter_ms[name]:.2f} ms")
    return block_ms, block_ms_xla, drafter_ms
