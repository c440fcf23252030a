"""The CPU int8 product kernel (tandem.model.kernels): exact against a float64 reference, batch-invariant per column,
used by the primary when its weights come quantized, and off cleanly where it cannot run."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, make_engine, tiny_state

from tandem.model import kernels
from tandem.model.layers import (
    apply_rope,
    cache_mask,
    causal_block_mask,
    rms_norm,
    rope_tables,
    two_part_attention,
)
from tandem.model.primary import PrimaryRunner, params_from_state_dict

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the int8 kernel cannot run on this machine")


def random_blocks(out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1-like blocks: q in 0..15, float16 scales and offsets of both signs."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (out, inp)).astype(np.int8)
    scale = (rng.standard_normal((out, inp // kernels.BLOCK)) * 0.01).astype(np.float16).astype(np.float32)
    offset = (rng.standard_normal((out, inp // kernels.BLOCK)) * 0.05).astype(np.float16).astype(np.float32)
    return q, scale, offset


@needs_kernel
@pytest.mark.parametrize(("out", "inp"), [(8, 32), (24, 64), (960, 576), (576, 1536)])
def test_product_matches_float64_reference(out: int, inp: int) -> None:
    blocks = random_blocks(out, inp)
    x = np.random.default_rng(1).standard_normal((inp, 5)).astype(np.float32)
    got = np.asarray(kernels.qmatmul(kernels.to_panels(*blocks), jnp.asarray(x)))
    want = kernels.dequantize(*blocks).astype(np.float64) @ x.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_kernel
def test_each_column_is_bitwise_independent_of_the_others() -> None:
    panels = kernels.to_panels(*random_blocks(576, 576))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((576, kernels.MAX_COLUMNS)).astype(np.float32)
    full = np.asarray(kernels.qmatmul(panels, jnp.asarray(x)))
    for n in range(1, kernels.MAX_COLUMNS + 1):
        other = rng.standard_normal((576, n)).astype(np.float32)
        other[:, 0] = x[:, 0]  # column 0 alone, beside 0..n-1 different neighbours
        got = np.asarray(kernels.qmatmul(panels, jnp.asarray(other)))
        np.testing.assert_array_equal(got[:, 0], full[:, 0], err_msg=f"N = {n}")
        np.testing.assert_array_equal(np.asarray(kernels.qmatmul(panels, jnp.asarray(x[:, :n]))), full[:, :n])


def dot_reference(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The dot form's product in float64: each column of x quantized per 32-input block as the kernel does."""
    o, i = q.shape
    xb = x.reshape(i // kernels.BLOCK, kernels.BLOCK, -1)  # [I/32, 32, N]
    amax = np.abs(xb).max(axis=1)  # [I/32, N]
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[:, None]).astype(np.float64)  # round half to even, as nearbyint
    d = (amax / np.float32(127)).astype(np.float64)
    dots = np.einsum("obk,bkn->obn", q.reshape(o, -1, kernels.BLOCK).astype(np.float64), xq)  # [O, I/32, N]
    sums = xb.astype(np.float64).sum(axis=1)  # [I/32, N]
    return (scale[..., None] * d * dots + offset[..., None] * sums).sum(axis=1)


def q8_blocks(out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_0 blocks (signed integers, float16 scales, no offsets) of a random weight, with a -128 in the first block
    (GGUF's quantizer never writes one, a file may hold one)."""
    q, scale, offset = kernels.quantize_q8(np.random.default_rng(seed).standard_normal((out, inp)).astype(np.float32))
    q[0, 0] = -128
    return q, scale, offset


@needs_kernel
@pytest.mark.parametrize("form", ["4-bit", "8-bit"])
@pytest.mark.parametrize(("out", "inp", "n"), [(8, 32, 1), (24, 64, 3), (960, 576, 8), (576, 1536, 13)])
def test_dot_form_matches_its_float64_reference(form: str, out: int, inp: int, n: int) -> None:
    blocks = random_blocks(out, inp, seed=7) if form == "4-bit" else q8_blocks(out, inp, seed=7)
    x = np.random.default_rng(8).standard_normal((inp, n)).astype(np.float32)
    x[:32, 0] = 0.0  # an all-zero block quantizes to zeros
    x[inp - 1, -1] = -4 * np.abs(x[inp - 32 :, -1]).max()  # a block whose extreme input quantizes to -127
    panels = kernels.to_panels(*blocks, dot=True)
    per_group = 8 if form == "4-bit" else 4
    assert panels.dot and panels.four_bit == (form == "4-bit")
    assert panels.q.shape == (out // 8, inp // per_group, 8, 4) and (panels.offset is None) == (form == "8-bit")
    got = np.asarray(kernels.qmatmul(panels, jnp.asarray(x)))
    want = dot_reference(*blocks, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = kernels.dequantize(*blocks).astype(np.float64) @ x.astype(np.float64)  # what 8-bit inputs cost
    assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()


@needs_kernel
@pytest.mark.parametrize("form", ["4-bit", "8-bit"])
def test_dot_form_columns_are_bitwise_independent_at_any_width(form: str) -> None:
    blocks = random_blocks(576, 576, seed=9) if form == "4-bit" else q8_blocks(576, 576, seed=9)
    panels = kernels.to_panels(*blocks, dot=True)
    layer = kernels.QLinear(jnp.zeros((576, 576), jnp.float32), panels)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((576, 3)).astype(np.float32)
    alone = np.asarray(kernels.qmatmul(panels, jnp.asarray(x)))
    for n in (1, 3, 4, 5, 8, 9, 17):  # wider than MAX_COLUMNS too: dot-form products never go to XLA
        other = rng.standard_normal((576, n)).astype(np.float32)
        other[:, : min(n, 3)] = x[:, : min(n, 3)]
        got = np.asarray(jax.jit(lambda v: layer @ v)(jnp.asarray(other)))
        np.testing.assert_array_equal(got[:, : min(n, 3)], alone[:, : min(n, 3)], err_msg=f"N = {n}")


def attention_inputs(t: int, lengths: list[int], segments: tuple[int, ...], seed: int = 0, h: int = 16):
    """Random queries [K, G, H, B, T], block keys/values [B, K, T, H] and context segments [B, K, S_j, H]."""
    rng = np.random.default_rng(seed)
    k_heads, g, b = 2, 3, len(lengths)
    q = rng.standard_normal((k_heads, g, h, b, t)).astype(np.float32)
    blk_k, blk_v = (rng.standard_normal((b, k_heads, t, h)).astype(np.float32) for _ in range(2))
    ctx_k = tuple(rng.standard_normal((b, k_heads, s, h)).astype(np.float32) for s in segments)
    ctx_v = tuple(rng.standard_normal((b, k_heads, s, h)).astype(np.float32) for s in segments)
    return q, blk_k, blk_v, np.asarray(lengths, np.int32), ctx_k, ctx_v


@needs_kernel
@pytest.mark.parametrize("h", [16, 64])  # 64: SmolLM2's head size, which the kernel unrolls
def test_fixed_order_attention_matches_the_two_part_attention(h: int) -> None:
    segments = (8, 8, 16, 40)
    q, blk_k, blk_v, lengths, ctx_k, ctx_v = attention_inputs(3, [5, 0, 70], segments, h=h)
    got = np.asarray(kernels.attention(*map(jnp.asarray, (q, blk_k, blk_v, lengths)), ctx_k, ctx_v))
    starts = np.cumsum((0, *segments))
    masks = tuple(cache_mask(jnp.asarray(lengths), 3, e - s, s) for s, e in itertools.pairwise(starts))
    block = (jnp.asarray(np.transpose(a, (1, 3, 0, 2))) for a in (blk_k, blk_v))  # [K, H, B, T]
    want = two_part_attention(jnp.asarray(q), ctx_k, ctx_v, masks, *block, causal_block_mask(3, 3))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("h", [16, 64])
# 7: the moved token completes a run of 8 cached keys, scored 8 at a time; 31: a window of 32 values (AttendGroup)
@pytest.mark.parametrize("cached", [6, 7, 31, 40])
def test_fixed_order_attention_gives_a_query_bitwise_the_same_output_however_its_past_is_split(
    cached: int, h: int
) -> None:
    """Query t of a block after L cached positions, against the same query after L + 1 cached positions (the block's
    first token moved into the cache), alone in a one-token block, and beside another row."""
    q, blk_k, blk_v, lengths, ctx_k, ctx_v = attention_inputs(3, [cached], (48, 8), h=h)
    full = np.asarray(kernels.attention(*map(jnp.asarray, (q, blk_k, blk_v, lengths)), ctx_k, ctx_v))
    moved_k, moved_v = ctx_k[0].copy(), ctx_v[0].copy()
    moved_k[:, :, cached], moved_v[:, :, cached] = blk_k[:, :, 0], blk_v[:, :, 0]
    later = kernels.attention(
        jnp.asarray(q[..., 1:]),
        jnp.asarray(blk_k[:, :, 1:]),
        jnp.asarray(blk_v[:, :, 1:]),
        jnp.asarray([cached + 1]),
        (jnp.asarray(moved_k), jnp.asarray(ctx_k[1])),
        (jnp.asarray(moved_v), jnp.asarray(ctx_v[1])),
    )
    np.testing.assert_array_equal(np.asarray(later), full[..., 1:])
    alone = kernels.attention(*map(jnp.asarray, (q[..., :1], blk_k[:, :, :1], blk_v[:, :, :1], lengths)), ctx_k, ctx_v)
    np.testing.assert_array_equal(np.asarray(alone), full[..., :1])
    q2, k2, v2, _, c2k, c2v = attention_inputs(3, [cached], (48, 8), seed=1, h=h)  # a second row beside it
    pair = kernels.attention(
        jnp.asarray(np.concatenate([q, q2], axis=3)),
        *(jnp.asarray(np.concatenate(a, axis=0)) for a in ((blk_k, k2), (blk_v, v2))),
        jnp.asarray([cached, 3]),
        tuple(jnp.asarray(np.concatenate(a, axis=0)) for a in zip(ctx_k, c2k, strict=True)),
        tuple(jnp.asarray(np.concatenate(a, axis=0)) for a in zip(ctx_v, c2v, strict=True)),
    )
    np.testing.assert_array_equal(np.asarray(pair)[:, :, :, :1], full)


@needs_kernel
def test_fixed_order_attention_reads_each_rows_slot_of_a_pool_in_place() -> None:
    """Rows given as slots of a 4-slot pool read those slots' segments: bitwise what the gathered rows give."""
    q, blk_k, blk_v, lengths, _, _ = attention_inputs(2, [9, 30], (16, 32), h=64)
    _, _, _, _, pool_k, pool_v = attention_inputs(2, [0, 0, 0, 0], (16, 32), seed=5, h=64)
    block = [jnp.asarray(a) for a in (q, blk_k, blk_v, lengths)]
    slots = np.asarray([3, 1], np.int32)
    gathered = kernels.attention(*block, tuple(c[slots] for c in pool_k), tuple(c[slots] for c in pool_v))
    in_place = kernels.attention(*block, pool_k, pool_v, jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(in_place), np.asarray(gathered))
    with pytest.raises(Exception, match="outside the context segments"):
        np.asarray(kernels.attention(*block, pool_k, pool_v, jnp.asarray([3, 4], np.int32)))


@needs_kernel
def test_attention_write_attends_as_attention_then_writes_the_block_into_the_pool_in_place() -> None:
    """Row 0 writes across a segment boundary, row 1 into the first segment, a padding row (full-context length)
    nowhere; under jit with the pool donated, as the cached stack calls it."""
    q, blk_k, blk_v, _, _, _ = attention_inputs(3, [0, 0, 0], (16, 32), h=64)
    _, _, _, _, pool_k, pool_v = attention_inputs(3, [0, 0, 0, 0], (16, 32), seed=5, h=64)
    lengths, slots = np.asarray([14, 3, 48], np.int32), np.asarray([2, 0, 2], np.int32)
    block = [jnp.asarray(a) for a in (q, blk_k, blk_v, lengths)]
    want = np.asarray(kernels.attention(*block, pool_k, pool_v, jnp.asarray(slots)))
    want_k, want_v = (np.concatenate([np.asarray(c) for c in pool], axis=2) for pool in (pool_k, pool_v))
    for b in range(2):
        want_k[slots[b], :, lengths[b] : lengths[b] + 3] = blk_k[b]
        want_v[slots[b], :, lengths[b] : lengths[b] + 3] = blk_v[b]
    write = jax.jit(kernels.attention_write, donate_argnums=(5, 6))
    got, got_k, got_v = write(*block, jnp.asarray(slots), tuple(map(jnp.array, pool_k)), tuple(map(jnp.array, pool_v)))
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in got_k], axis=2), want_k)
    np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in got_v], axis=2), want_v)


@needs_kernel
def test_rope_kernels_match_xla_and_give_a_position_the_same_bits_in_any_call() -> None:
    positions = jnp.asarray(np.arange(5, 69, dtype=np.int32)[None])  # [1, 64]
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 2, 64, 64)).astype(np.float32))  # [K, G, H, N]
    cos, sin = kernels.rope_tables(positions, 64, 10000.0)
    want = apply_rope(x, *rope_tables(positions, 64, 10000.0))
    np.testing.assert_allclose(np.asarray(kernels.rope(x, cos, sin)), np.asarray(want), rtol=1e-5, atol=1e-5)
    full = np.asarray(kernels.rope(x, cos, sin))
    for n in (1, 3, 8):  # the last n positions alone
        c, s = kernels.rope_tables(positions[:, -n:], 64, 10000.0)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(cos)[:, -n:])
        np.testing.assert_array_equal(np.asarray(kernels.rope(x[..., -n:], c, s)), full[..., -n:])


@needs_kernel
def test_fixed_order_rms_norm_matches_and_is_the_same_per_column_at_any_width() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((576, 17)) * 10).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    full = np.asarray(kernels.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5))
    np.testing.assert_allclose(full, np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)), rtol=1e-5, atol=1e-6)
    for n in (1, 2, 8, 9):
        np.testing.assert_array_equal(
            np.asarray(kernels.rms_norm(jnp.asarray(x[:, :n]), jnp.asarray(w), 1e-5)), full[:, :n]
        )


@needs_kernel
@pytest.mark.parametrize(("v", "n"), [(1, 1), (7, 3), (4096, 2), (49152, 8), (10000, 17)])
def test_argmax_is_jnp_argmax_ties_and_nans_included(v: int, n: int) -> None:
    rng = np.random.default_rng(v + n)
    x = rng.integers(-3, 4, (v, n)).astype(np.float32)  # few values: many ties, first occurrence must win
    x[rng.integers(0, v, 3), rng.integers(0, n, 3)] = np.nan  # in up to three columns a NaN wins
    if v > 1:
        x[:, 0] = -np.inf  # a column with every entry alike
    np.testing.assert_array_equal(np.asarray(kernels.argmax(jnp.asarray(x))), np.argmax(x, axis=0))
    np.testing.assert_array_equal(np.asarray(kernels.argmax(jnp.asarray(x))), np.asarray(jnp.argmax(x, axis=0)))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 5, kernels.MAX_COLUMNS])
def test_four_bit_panels_give_bitwise_the_eight_bit_product(n: int) -> None:
    q, scale, offset = random_blocks(960, 576, seed=5)
    four = kernels.to_panels(q, scale, offset)
    eight = kernels.QPanels(  # the same blocks as 8-bit panels (to_panels picks 4-bit ones for them)
        q=jnp.asarray(np.ascontiguousarray(q.reshape(120, 8, 576).transpose(0, 2, 1))),
        scale=four.scale.astype(jnp.float32),
        offset=four.offset.astype(jnp.float32),
    )
    assert four.four_bit and not eight.four_bit
    x = jnp.asarray(np.random.default_rng(6).standard_normal((576, n)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(kernels.qmatmul(four, x)), np.asarray(kernels.qmatmul(eight, x)))


@needs_kernel
def test_qlinear_uses_the_kernel_up_to_max_columns_and_xla_beyond() -> None:
    layer = kernels.qlinear(*random_blocks(64, 96))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((96, kernels.MAX_COLUMNS + 1)).astype(np.float32))
    small, large = x[:, : kernels.MAX_COLUMNS], x
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda v: layer @ v)(small)), np.asarray(kernels.qmatmul(layer.panels, small))
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: layer @ v)(large)), np.asarray(layer.w @ large))


def test_to_panels_round_trips_and_rejects_shapes_it_cannot_panel() -> None:
    q, scale, offset = random_blocks(16, 64)
    panels = kernels.to_panels(q, scale, offset)  # Q4_1-like: two inputs per byte, float16 scales
    assert panels.four_bit and panels.q.shape == (2, 32, 8) and panels.scale.shape == (2, 2, 8)
    assert panels.scale.dtype == jnp.float16 and panels.offset.dtype == jnp.float16
    packed = np.asarray(panels.q)[1, :, 3]  # row p*8 + r is panel p, lane r
    np.testing.assert_array_equal(packed & 15, q[8 + 3, 0::2])
    np.testing.assert_array_equal(packed >> 4, q[8 + 3, 1::2])
    wide = kernels.to_panels(q - 8, scale, offset)  # a negative integer: 8-bit panels
    assert not wide.four_bit and wide.q.shape == (2, 64, 8) and wide.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(wide.q)[1, :, 3], q[8 + 3] - 8)
    unhalved = kernels.to_panels(q, scale + np.float32(1e-7), offset)  # a scale float16 cannot hold: 8-bit panels
    assert not unhalved.four_bit
    with pytest.raises(ValueError, match="O % 8"):
        kernels.to_panels(q[:12], scale[:12], offset[:12])
    with pytest.raises(ValueError, match="I % 32"):
        kernels.to_panels(q[:, :48], scale[:, :1], offset[:, :1])


def test_quantize_q8_is_close_and_dequantizes_exactly_as_blocks_say() -> None:
    w = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    q, scale, offset = kernels.quantize_q8(w)
    assert q.dtype == np.int8 and not offset.any()
    np.testing.assert_allclose(kernels.dequantize(q, scale, offset), w, atol=np.abs(w).max() / 100)
    np.testing.assert_array_equal(kernels.quantize_q8(np.zeros((8, 32), np.float32))[0], 0)  # no division by zero


def quantized_tiny_params():
    """The tiny model with every matrix Q8_0-quantized: its float weights are the blocks' dequantized values."""
    state = tiny_state()
    blocks = {name: kernels.quantize_q8(w) for name, w in state.items() if w.ndim == 2}
    state = {name: kernels.dequantize(*blocks[name]) if name in blocks else w for name, w in state.items()}
    return state, params_from_state_dict(TINY, state, blocks=blocks)


def test_quantized_primary_gets_panels_for_every_product() -> None:
    _, params = quantized_tiny_params()
    for layer in params.layers:
        for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down):
            assert isinstance(w, kernels.QLinear) and w.panels is not None
            assert w.panels.q.shape == (w.shape[0] // 8, w.shape[1], 8)
    assert isinstance(params.head, kernels.QLinear)


@needs_kernel
def test_quantized_primary_matches_its_float_twin_and_stays_lossless() -> None:
    state, params = quantized_tiny_params()
    plain = params_from_state_dict(TINY, state)  # the same float weights, every product in XLA
    tokens = np.asarray([[3, 14, 15, 9, 26, 5, 35, 8]], np.int32)
    got, want = (PrimaryRunner(TINY, p, batch=1, max_len=64).forward(tokens).logits for p in (params, plain))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    engine = make_engine(params)
    for seed in range(6):
        prompt = list(np.random.default_rng(seed).integers(0, TINY.vocab_size, size=4 + seed))
        want_ids = engine.generate(prompt, mode="primary", max_tokens=40).token_ids
        for mode in ("speed", "tandem-speed"):
            assert engine.generate(prompt, mode=mode, max_tokens=40).token_ids == want_ids, (mode, seed)


@needs_kernel
def test_the_library_is_built_once_into_the_kernel_cache() -> None:
    libraries = list(Path(os.environ["TANDEM_KERNEL_CACHE"]).glob(f"qmatmul-{kernels.isa()}-*.so"))
    assert len(libraries) == 1, libraries  # conftest points the cache at a fresh directory: built by this session


# Every kernel on fixed inputs, saved to the .npz given as argv[1] (run once per build by the test below).
_EVERY_KERNEL = """
import sys
import jax.numpy as jnp
import numpy as np
from test_kernels import attention_inputs, q8_blocks, random_blocks
from tandem.model import kernels

assert kernels.available()
out = {"isa": np.asarray(kernels.isa())}
x = np.random.default_rng(1).standard_normal((576, 17)).astype(np.float32)
for form, blocks in (("4-bit", random_blocks(64, 576)), ("8-bit", q8_blocks(64, 576))):
    for dot in (False, True):
        for n in (1, 3, 4, 8, 17) if dot else (1, 3, 8):
            out[f"{form} dot={dot} n={n}"] = kernels.qmatmul(kernels.to_panels(*blocks, dot=dot), jnp.asarray(x[:, :n]))
q, blk_k, blk_v, lengths, ctx_k, ctx_v = attention_inputs(5, [3, 0, 20, 70], (8, 16, 48), h=64)
out["attention"] = kernels.attention(*map(jnp.asarray, (q, blk_k, blk_v, lengths)), ctx_k, ctx_v)
out["rms_norm"] = kernels.rms_norm(jnp.asarray(x), jnp.asarray(x[:, 0]), 1e-5)
out["argmax"] = kernels.argmax(jnp.asarray(x))
np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in out.items()})
"""


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(kernels.isa() == "avx2", reason="this CPU runs only the AVX2 build")
def test_every_build_gives_bitwise_the_same_results(tmp_path: Path) -> None:
    results = {}
    here = Path(__file__).parent
    path_dirs = os.pathsep.join((str(here), str(here.parent)))  # this module, and the conftest it imports
    for name in kernels.ISAS:
        env = {**os.environ, "TANDEM_KERNEL_ISA": name, "PYTHONPATH": path_dirs}
        path = tmp_path / f"{name}.npz"
        done = subprocess.run(
            [sys.executable, "-c", _EVERY_KERNEL, str(path)], env=env, capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        results[name] = dict(np.load(path))
        assert str(results[name].pop("isa")) == name
    first, *others = results.values()
    for name, other in zip(list(results)[1:], others, strict=True):
        assert other.keys() == first.keys()
        for key, value in first.items():
            np.testing.assert_array_equal(other[key], value, err_msg=f"{name}: {key}")


@needs_kernel
def test_the_build_can_be_chosen_and_a_wrong_choice_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_KERNEL_ISA", "avx2")
    assert kernels.isa() == "avx2"
    monkeypatch.setenv("TANDEM_KERNEL_ISA", "sse2")
    with pytest.raises(ValueError, match="expected one of avx512vnni, avx2"):
        kernels.isa()


def test_the_kernel_can_be_switched_off() -> None:
    code = "from tandem.model import kernels; print(kernels.available())"
    env = {**os.environ, "TANDEM_QMATMUL": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@needs_kernel
def test_the_bench_times_the_kernel_beside_its_xla_twin() -> None:
    from benchmark.config import BenchConfig
    from benchmark.micro import xla_twin
    from benchmark.report import build_report, render_markdown
    from tandem.decoding.costs import measure_block_costs

    _, params = quantized_tiny_params()
    runner = PrimaryRunner(TINY, params, batch=1, max_len=64)
    twin = xla_twin(runner)
    assert twin is not None and twin.params.head_panels is None
    assert not any(isinstance(layer.wqkv, kernels.QLinear) for layer in twin.params.layers)
    assert twin.params.layers[0].w_down is params.layers[0].w_down.w  # shared, not copied
    assert xla_twin(twin) is None  # nothing to compare a float-only primary with
    served, xla = measure_block_costs([runner, twin], context=5, max_k=3, calls=2, warmup=1)
    assert set(served) == set(xla) == {1, 2, 3} and min(*served.values(), *xla.values()) > 0
    cfg = BenchConfig(modes=("primary",), vias=("in-process",))
    report = build_report(cfg, [], {}, block_ms=served, block_ms_xla=xla)
    assert report["block_cost_ms_xla"] == {str(k): v for k, v in xla.items()}
    assert "| ms, XLA float32 products |" in render_markdown(report)
