"""The int8 kernel's two panel forms on SmolLM2's real Q4_1 layer weights: 4-bit panels (what the primary serves)
against 8-bit panels of the same blocks, each weight of all 30 layers, 1 / 2 / 4 / 8 columns, interleaved call by
call in one process, outputs checked bitwise equal. Usage: `.venv/bin/python bench/panel_forms.py` (~15 s)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tandem import kernels
from tandem.models import BundleConfig, load_primary


def eight_bit(p: kernels.QPanels) -> kernels.QPanels:
    """The same blocks as 8-bit panels: one integer per byte, float32 scales and offsets."""
    q = np.asarray(p.q)  # [O/8, I/2, 8]
    wide = np.empty((q.shape[0], 2 * q.shape[1], q.shape[2]), np.int8)  # [O/8, I, 8]
    wide[:, 0::2], wide[:, 1::2] = q & 15, q >> 4
    return kernels.QPanels(q=jnp.asarray(wide), scale=p.scale.astype(jnp.float32), offset=p.offset.astype(jnp.float32))


def main(calls: int = 15) -> None:
    assert kernels.available(), "the int8 kernel does not run here"
    runner, _ = load_primary(BundleConfig(slots=1, max_len=64))
    product = jax.jit(lambda panels, x: sum(kernels.qmatmul(p, x) for p in panels))
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        four = [getattr(layer, name).panels for layer in runner.params.layers]
        eight = [eight_bit(p) for p in four]
        for n in (1, 2, 4, 8):
            x = jnp.asarray(np.random.default_rng(n).standard_normal((2 * four[0].q.shape[1], n)), jnp.float32)
            assert np.array_equal(np.asarray(product(four, x)), np.asarray(product(eight, x)))
            ms: dict[str, list[float]] = {"4-bit": [], "8-bit": []}
            for _ in range(calls):
                for form, panels in (("4-bit", four), ("8-bit", eight)):
                    start = time.perf_counter()
                    product(panels, x).block_until_ready()
                    ms[form].append(1000 * (time.perf_counter() - start))
            four_ms, eight_ms = (statistics.median(v) for v in ms.values())
            print(
                f"{name} [{four[0].q.shape[0] * 8}, {2 * four[0].q.shape[1]}] x 30 layers, {n} columns: "
                f"4-bit {four_ms:.2f} ms, 8-bit {eight_ms:.2f} ms ({four_ms / eight_ms:.2f}x)"
            )


if __name__ == "__main__":
    main()
