"""The int8 kernel's panel forms on SmolLM2's real Q4_1 layer weights: 4-bit panels with float inputs against 8-bit
panels of the same blocks (outputs checked bitwise equal) and against the dot form, whose products take 8-bit inputs
(what the served primary runs), each weight of all 30 layers, 1 / 2 / 4 / 8 / 16 columns (the float-input forms run
at most 8), interleaved call by call in one process; then the Q8_0 head, float inputs against its 8-bit dot form.
Usage: `.venv/bin/python experiments/panel_forms.py` (~40 s)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tandem.decoding.bundle import BundleConfig, load_primary
from tandem.model import kernels


def eight_bit(p: kernels.QPanels) -> kernels.QPanels:
    """The same blocks as 8-bit panels: one integer per byte, float32 scales and offsets."""
    assert p.offset is not None  # Q4_1 blocks have offsets
    q = np.asarray(p.q)  # [O/8, I/2, 8]
    wide = np.empty((q.shape[0], 2 * q.shape[1], q.shape[2]), np.int8)  # [O/8, I, 8]
    wide[:, 0::2], wide[:, 1::2] = q & 15, q >> 4
    return kernels.QPanels(q=jnp.asarray(wide), scale=p.scale.astype(jnp.float32), offset=p.offset.astype(jnp.float32))


def interleaved_ms(fn: Callable[[Any, jax.Array], jax.Array], forms: dict[str, Any], x: jax.Array, calls: int) -> dict:
    """Median ms of fn(form, x) per form, the forms taking turns call by call."""
    ms: dict[str, list[float]] = {form: [] for form in forms}
    for _ in range(calls):
        for form, weights in forms.items():
            start = time.perf_counter()
            fn(weights, x).block_until_ready()
            ms[form].append(1000 * (time.perf_counter() - start))
    return {form: statistics.median(v) for form, v in ms.items()}


def main(calls: int = 15) -> None:
    assert kernels.available(), "the int8 kernel does not run here"
    runner, _ = load_primary(BundleConfig(slots=1, max_len=64, int8_activations=False))
    dotted, _ = load_primary(BundleConfig(slots=1, max_len=64, int8_activations=True))
    product = jax.jit(lambda panels, x: sum(kernels.qmatmul(p, x) for p in panels))
    totals: dict[int, dict[str, float]] = {}
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        four = [getattr(layer, name).panels for layer in runner.params.layers]
        forms = {"4-bit": four, "8-bit": [eight_bit(p) for p in four]}
        forms["dot"] = [getattr(layer, name).panels for layer in dotted.params.layers]
        for n in (1, 2, 4, 8, 16):
            x = jnp.asarray(np.random.default_rng(n).standard_normal((2 * four[0].q.shape[1], n)), jnp.float32)
            timed = forms if n <= kernels.MAX_COLUMNS else {"dot": forms["dot"]}
            if n <= kernels.MAX_COLUMNS:
                assert np.array_equal(np.asarray(product(four, x)), np.asarray(product(forms["8-bit"], x)))
            medians = interleaved_ms(product, timed, x, calls)
            for form, v in medians.items():
                totals.setdefault(n, {}).setdefault(form, 0.0)
                totals[n][form] += v
            shape = f"[{four[0].q.shape[0] * 8}, {2 * four[0].q.shape[1]}]"
            print(
                f"{name} {shape} x 30 layers, {n} columns: " + ", ".join(f"{f} {v:.2f} ms" for f, v in medians.items())
            )
    for n, by_form in totals.items():
        line = ", ".join(f"{f} {v:.2f} ms" for f, v in by_form.items())
        ratio = f" (dot / 4-bit {by_form['dot'] / by_form['4-bit']:.2f}x)" if "4-bit" in by_form else ""
        print(f"all four products, {n} columns: {line}{ratio}")
    heads = {"8-bit": runner.params.head, "dot": dotted.params.head}  # the Q8_0 head, float or 8-bit inputs
    apply = jax.jit(lambda head, x: head @ x)
    for n in (1, 2, 4, 8, 16):
        x = jnp.asarray(np.random.default_rng(n).standard_normal((heads["dot"].shape[1], n)), jnp.float32)
        head_forms = heads if n <= kernels.MAX_COLUMNS else {"dot": heads["dot"]}
        medians = interleaved_ms(apply, head_forms, x, calls)
        ratio = f" (dot / 8-bit {medians['dot'] / medians['8-bit']:.2f}x)" if "8-bit" in medians else ""
        print(
            f"head {list(heads['dot'].shape)}, {n} columns: "
            + ", ".join(f"{f} {v:.2f} ms" for f, v in medians.items())
            + ratio
        )


if __name__ == "__main__":
    main()
