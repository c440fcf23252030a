"""The CPU primary's kernels, as XLA FFI custom calls: weight-only int8 matrix products (`qmatmul.cc`) and
fixed-order attention and RMSNorm (`attention.cc`).

The bundled SmolLM2 GGUF stores its layer weights as Q4_1 and its embedding, which is also the head, as Q8_0 blocks: per
row and per 32 inputs, one float16 scale (and for Q4_1 one float16 offset) and 32 small integers. Dequantized to
float32 they are the float model; XLA then streams 4 bytes per weight on every step. `qmatmul` streams the integers:
- float inputs: Q4_1 blocks stay two integers per byte with float16 scales and offsets (0.625 bytes per weight), Q8_0
  and other 8-bit blocks one integer per byte with float32 scales (1.25 bytes); each weight is dequantized in
  registers to exactly the float32 weight the loader produces. Up to MAX_COLUMNS tokens; wider products (batches of
  many sessions) go to XLA, which is compute-bound there and faster;
- 8-bit inputs (the dot forms, `QPanels.dot`, what the served primary's Q4_1 layers and Q8_0 head use): each column
  of x is quantized per 32-input block (scale max|x| / 127, as GGUF's Q8_0 and llama.cpp's CPU products of Q4_1 and
  Q8_0 weights do) and multiplied in integers (vpmaddubsw + vpmaddwd; signed Q8_0 weights through vpsignb), any
  number of columns. On the 2-core Zen 4 EPYC the four layer products of all 30 layers cost 0.61x / 0.50x / 0.45x
  the float-input kernel's time at 1 / 4 / 8 columns (`experiments/panel_forms.py`), the head 0.68x / 0.52x / 0.46x; the
  model's cross-entropy on the project's README of that release rises by 0.24% (CHANGELOG.md).

Every output element is one sum over the inputs in a fixed order, so a column's result is bitwise the same whatever
the other columns are (tests/unit/test_kernels.py). `attention` and `rms_norm` do the same for the rest of a pass: each
query attends its positions in position order whether they are cached or in the block, so with them
(`PrimaryRunner.fixed_order`) a token's logits and states are bitwise the same in a one-token step, a k-token verify
and a batch of sessions (wide batches' head products, in XLA, aside). That is what makes the 8-bit inputs lossless:
their rounding would turn any last-bit difference between a verify and single steps into different tokens.

The library is compiled from the sources on first use (g++ or c++ against jaxlib's FFI headers, ~5 s) into
`$TANDEM_KERNEL_CACHE` (default: `kernels/` in the asset cache, `$TANDEM_CACHE` or `~/.cache/tandem`), keyed by the
sources, jaxlib's version and the flags; the CPU container image ships it prebuilt. It comes in two builds (`ISAS`),
AVX2 and AVX-512 VNNI (the 8-bit-input products in one vpdpbusd per 4 bytes: 16–24% faster at 4–8 columns on the Zen 4
EPYC, `experiments/panel_forms.py` under each `TANDEM_KERNEL_ISA`), bitwise the same; a process loads the best one its
CPU runs (`isa`). It is used only on the CPU backend of an x86-64 machine with AVX2, FMA and F16C; elsewhere (TPU, GPU,
no compiler and no built library, `TANDEM_QMATMUL=0`) every product runs in XLA on the float32 weights, which `QLinear`
always keeps, and attention and norms in XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tandem.formats.assets import cache_root

log = logging.getLogger(__name__)

BLOCK = 32  # inputs per scale/offset (GGUF's Q4_1 and Q8_0 block)
PANEL = 8  # output rows per panel: one AVX2 register of float32
MAX_COLUMNS = 8  # products with more columns run in XLA (compute-bound there; XLA's GEMM is faster)
_TARGET = "tandem_qmatmul"  # 8-bit panels
_TARGET4 = "tandem_qmatmul4"  # 4-bit panels
_TARGET_DOT = "tandem_qmatmul4_dot"  # 4-bit panels in the dot layout, inputs quantized to 8 bits
_TARGET8_DOT = "tandem_qmatmul8_dot"  # 8-bit panels in the dot layout, inputs quantized to 8 bits
_ATTENTION = "tandem_attention"  # fixed-order attention (attention.cc)
_ATTENTION_WRITE = "tandem_attention_write"  # the same, then the block written into the cache in place
_RMS_NORM = "tandem_rms_norm"
_ROPE_TABLES = "tandem_rope_tables"
_ROPE = "tandem_rope"
_ARGMAX = "tandem_argmax"
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("qmatmul.cc", "attention.cc"))
_HEADERS = (Path(__file__).with_name("parallel.h"),)
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-std=c++17", "-w")
# The builds, by instruction set: the CPU flags each needs and the compiler flags it adds. The best one this CPU has
# is loaded (`isa`); their products are bitwise the same (qmatmul.cc, Dot4).
_AVX2 = frozenset({"avx2", "fma", "f16c"})
ISAS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "avx512vnni": (_AVX2 | {"avx512_vnni", "avx512vl"}, ("-mavx512vnni", "-mavx512vl", "-DTANDEM_VNNI")),
    "avx2": (_AVX2, ()),
}


@struct.dataclass
class QPanels:
    """Integer weights in 8-row panels: W[p*8 + r, i] = scale[p, i // 32, r] * q(p, i, r) + offset[p, i // 32, r].

    8-bit: q [O/8, I, 8] int8 and q(p, i, r) = q[p, i, r]; scale and offset float32. 4-bit (every q in 0..15, scales
    and offsets float16 values, as in GGUF's Q4_1): q [O/8, I/2, 8] uint8 with input i in the low and input i + 1 in
    the high nibble of q[p, i // 2, r] (i even); scale and offset float16. Dot form (4-bit integers whose product
    quantizes its inputs to 8 bits, `dot`): q [O/8, I/8, 8, 4] uint8 with input 8g + j in the low and 8g + 4 + j in
    the high nibble of q[p, g, r, j]; scale and offset float16. 8-bit dot form (GGUF's Q8_0: signed integers, no
    offsets): q [O/8, I/4, 8, 4] int8 with q[p, g, r, j] = input 4g + j of row 8p + r; scale float16; offset None.
    """

    q: jax.Array  # [O/8, I, 8] int8, [O/8, I/2, 8] uint8 (4-bit), [O/8, I/8, 8, 4] uint8 or [O/8, I/4, 8, 4] int8 (dot)
    scale: jax.Array  # [O/8, I/32, 8] float32, or float16 (4-bit and dot forms)
    offset: jax.Array | None  # [O/8, I/32, 8] float32, or float16 (4-bit and dot forms); None: zero (8-bit dot form)

    @property
    def four_bit(self) -> bool:
        return self.q.dtype == jnp.uint8

    @property
    def dot(self) -> bool:
        """The product quantizes its inputs to 8 bits per 32-input block and runs integer dot products."""
        return self.q.ndim == 4

    @property
    def target(self) -> str:
        """The FFI custom call that multiplies these panels."""
        if self.dot:
            return _TARGET_DOT if self.four_bit else _TARGET8_DOT
        return _TARGET4 if self.four_bit else _TARGET


@struct.dataclass
class QLinear:
    """A weight `[out, in]` kept as float32 (`w`) and, where it came quantized, as integer panels.

    `QLinear @ x` is `w @ x` for x [in, N]; with panels and the kernel available, it runs `qmatmul` for
    N <= MAX_COLUMNS, and for every N with dot-form panels (whose product is not `w @ x` but its 8-bit-input
    approximation, which must then not depend on how many columns share the call).
    """

    w: jax.Array  # [O, I] float32, the dequantized weight
    panels: QPanels | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """[O, I], as the float32 weight's."""
        return tuple(self.w.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The float weight's dtype (what `W @ x` returns)."""
        return self.w.dtype

    def __matmul__(self, x: jax.Array) -> jax.Array:
        """[O, I] @ [I, N] -> [O, N]."""
        p = self.panels
        if p is not None and x.ndim == 2 and (p.dot or x.shape[1] <= MAX_COLUMNS) and available():
            return qmatmul(p, x)
        return self.w @ x


def float_weight(w: jax.Array | QLinear) -> jax.Array:
    """A weight's float array, whichever form it has."""
    return w.w if isinstance(w, QLinear) else w


def dequantize(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Row-blocked integers to float32, rounded as the kernel rounds them (one fused multiply-add).

    Args:
        q: [O, I] integers (int8).
        scale, offset: [O, I/32] float32.

    Returns:
        [O, I] float32 = scale * q + offset per 32-input block; exact for GGUF's Q8_0 and Q4_1, where scale and
        offset are float16 values and |q| < 2^8, so the product is exact and only the sum rounds.
    """
    blocks = q.reshape(q.shape[0], -1, BLOCK).astype(np.float64)
    w = blocks * scale[..., None].astype(np.float64) + offset[..., None].astype(np.float64)
    return w.reshape(q.shape).astype(np.float32)


def _fits_half(a: np.ndarray) -> bool:
    """Every value is a float16 value (so storing it as float16 loses nothing)."""
    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf: not equal, as it should be
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def to_panels(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, dot: bool = False) -> QPanels:
    """Row-blocked integers ([O, I] int8, scale and offset [O, I/32]) to the kernel's 8-row panels: 4-bit ones when
    every integer lies in 0..15 and every scale and offset is a float16 value (GGUF's Q4_1), else 8-bit ones. With
    `dot`, 4-bit ones, and 8-bit ones whose scales are float16 values and offsets zero (GGUF's Q8_0), come in the dot
    form (`QPanels.dot`: their products quantize the inputs to 8 bits).

    Raises:
        ValueError: O is not a multiple of 8 or I not a multiple of 32.
    """
    o, i = q.shape
    if o % PANEL or i % BLOCK or scale.shape != (o, i // BLOCK) or offset.shape != scale.shape:
        raise ValueError(f"cannot panel a [{o}, {i}] weight with scales {scale.shape}: need O % 8 == 0, I % 32 == 0")

    def panels(a: np.ndarray) -> np.ndarray:  # [O, X] -> [O/8, X, 8]
        return np.ascontiguousarray(a.reshape(o // PANEL, PANEL, -1).transpose(0, 2, 1))

    if q.min(initial=0) >= 0 and q.max(initial=0) <= 15 and _fits_half(scale) and _fits_half(offset):
        nibbles = panels(q.astype(np.uint8))  # [O/8, I, 8]
        if dot:  # input 8g + 4h + j of row r -> nibble h of byte [g, r, j]
            groups = nibbles.reshape(o // PANEL, i // 8, 2, 4, PANEL)
            packed = np.ascontiguousarray((groups[:, :, 0] | (groups[:, :, 1] << 4)).transpose(0, 1, 3, 2))
        else:  # [O/8, I/2, 8]: input i low, i + 1 high
            packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return QPanels(
            q=jnp.asarray(packed),
            scale=jnp.asarray(panels(scale.astype(np.float16))),
            offset=jnp.asarray(panels(offset.astype(np.float16))),
        )
    if dot and _fits_half(scale) and not offset.any():  # [O/8, I/4, 8, 4]: input 4g + j of row r at [g, r, j]
        groups = panels(q.astype(np.int8)).reshape(o // PANEL, i // 4, 4, PANEL)
        return QPanels(
            q=jnp.asarray(np.ascontiguousarray(groups.transpose(0, 1, 3, 2))),
            scale=jnp.asarray(panels(scale.astype(np.float16))),
            offset=None,
        )
    return QPanels(
        q=jnp.asarray(panels(q.astype(np.int8))),
        scale=jnp.asarray(panels(scale.astype(np.float32))),
        offset=jnp.asarray(panels(offset.astype(np.float32))),
    )


def qlinear(q: np.ndarray, scale: np.ndarray, offset: np.ndarray, dot: bool = False) -> QLinear:
    """A QLinear from row-blocked integers: the float32 weight (`dequantize`) and its panels (`to_panels`, in the dot
    form where `dot` and the blocks allow it)."""
    return QLinear(w=jnp.asarray(dequantize(q, scale, offset)), panels=to_panels(q, scale, offset, dot=dot))


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q8_0-style blocks of a float weight (lossy; for tests and models that come unquantized).

    Args:
        w: [O, I] floats, I a multiple of 32.

    Returns:
        (q [O, I] int8, scale [O, I/32] float32 holding float16 values, offset [O, I/32] zeros).
    """
    blocks = w.reshape(w.shape[0], -1, BLOCK).astype(np.float32)
    scale = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127).astype(np.int8).reshape(w.shape)
    return q, scale, np.zeros_like(scale)


def attention(
    q: jax.Array,
    block_k: jax.Array,
    block_v: jax.Array,
    lengths: jax.Array,
    ctx_k: tuple[jax.Array, ...],
    ctx_v: tuple[jax.Array, ...],
    rows: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention of a block after each row's cached prefix, in one fixed order per query (`attention.cc`):
    query t of row b reads the first lengths[b] cached positions of its slot, segment by segment, then the block's
    tokens 0..t, scored, exponentiated and summed in position order. Call `available()` first.

    Args:
        q: [K, G, H, B, T] queries (RoPE applied).
        block_k, block_v: [B, K, T, H] the block's own keys and values.
        lengths: [B] cached positions per row (the segments hold at least that many).
        ctx_k, ctx_v: segments [R, K, S_j, H] of the cached keys and values, in position order.
        rows: [B] each row's slot in the segments, read in place (None: row b is slot b, R = B).

    Returns:
        [K, G, H, B, T], each query's output bitwise the same whatever block and batch it came in.
    """
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(_ATTENTION, out)(*_attention_operands(q, block_k, block_v, lengths, rows), *ctx_k, *ctx_v)


def attention_write(
    q: jax.Array,
    block_k: jax.Array,
    block_v: jax.Array,
    lengths: jax.Array,
    rows: jax.Array,
    ctx_k: tuple[jax.Array, ...],
    ctx_v: tuple[jax.Array, ...],
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """`attention` over a cache pool's segments, then the block's keys and values written into them at each row's
    positions lengths[b] .. lengths[b] + T - 1 of its slot rows[b] (positions past the last segment are dropped, as a
    padding row's full-context length sends them there).

    The segments come back aliased to the operands, so a caller that donates the cache updates it in place: the write
    is part of the call instead of an XLA scatter per layer and segment, each of which XLA:CPU compiles into its own
    kernel with its own memory maps.

    Returns:
        (attention output [K, G, H, B, T], the written ctx_k, the written ctx_v).
    """
    n = len(ctx_k)
    out = [jax.ShapeDtypeStruct(q.shape, jnp.float32), *(jax.ShapeDtypeStruct(c.shape, jnp.float32) for c in ctx_k)]
    out += [jax.ShapeDtypeStruct(c.shape, jnp.float32) for c in ctx_v]
    first = 5  # the context operands follow q, block_k, block_v, lengths and rows
    call = jax.ffi.ffi_call(_ATTENTION_WRITE, out, input_output_aliases={first + j: 1 + j for j in range(2 * n)})
    attn, *written = call(*_attention_operands(q, block_k, block_v, lengths, rows), *ctx_k, *ctx_v)
    return attn, tuple(written[:n]), tuple(written[n:])


def _attention_operands(
    q: jax.Array, block_k: jax.Array, block_v: jax.Array, lengths: jax.Array, rows: jax.Array | None
) -> tuple[jax.Array, ...]:
    rows = jnp.arange(q.shape[3], dtype=jnp.int32) if rows is None else rows.astype(jnp.int32)
    return q, block_k, block_v, lengths.astype(jnp.int32), rows


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """`layers.rope_tables` computed per position in double (`attention.cc`), so a position's tables are bitwise the
    same in any call: XLA fuses its own sin and cos into each consumer, where their last bits can follow the shape.

    Returns:
        (cos, sin), each [H, N] for positions [B, T] (N = B * T).
    """
    n = positions.size
    table = jax.ShapeDtypeStruct((head_dim, n), jnp.float32)
    call = jax.ffi.ffi_call(_ROPE_TABLES, (table, table))
    cos, sin = call(positions.reshape(-1).astype(jnp.int32), theta=np.float32(theta))
    return cos, sin


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`layers.apply_rope` with each output computed from its own inputs in one fixed order (`attention.cc`).
    x: [..., H, N]; cos, sin: [H, N]."""
    return jax.ffi.ffi_call(_ROPE, jax.ShapeDtypeStruct(x.shape, jnp.float32))(x.astype(jnp.float32), cos, sin)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of each column of x [D, N] by weight [D], its sum of squares in input order (`attention.cc`)."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(_RMS_NORM, out)(x, weight.astype(jnp.float32), eps=np.float32(eps))


def argmax(x: jax.Array) -> jax.Array:
    """[V, N] float32 -> [N] int32: each column's first greatest row, NaN above every number, as `jnp.argmax(x, 0)`
    (which XLA runs ~10x slower over vocabulary-major logits on this CPU; `attention.cc`)."""
    return jax.ffi.ffi_call(_ARGMAX, jax.ShapeDtypeStruct(x.shape[1:], jnp.int32))(x.astype(jnp.float32))


def qmatmul(panels: QPanels, x: jax.Array) -> jax.Array:
    """The kernel: [O, I] panels times x [I, N] float32 -> [O, N] float32. Call `available()` first.

    Dot-form panels quantize each column of x per 32-input block first (scale max|x| / 127, round to nearest, as
    GGUF's Q8_0) and take integer dot products; their offsets multiply the block's float sum of x.
    """
    out = jax.ShapeDtypeStruct((panels.q.shape[0] * PANEL, x.shape[1]), jnp.float32)
    weights = (panels.q, panels.scale) if panels.offset is None else (panels.q, panels.scale, panels.offset)
    return jax.ffi.ffi_call(panels.target, out)(x.astype(jnp.float32), *weights)


@functools.cache
def available() -> bool:
    """Whether `qmatmul` can run here: CPU backend, x86-64 with AVX2, FMA and F16C, the library built (or a compiler to
    build it), not disabled by `TANDEM_QMATMUL=0`.

    Builds and registers the custom call on the first call; logs why not otherwise (a warning when this machine could
    run the kernel but the build failed).
    """
    reason = _unavailable_reason()
    if reason is not None:
        log.info("int8 product kernel off (%s); products run in XLA on float32 weights", reason)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(isa())))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.TandemQMatmul), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET4, jax.ffi.pycapsule(lib.TandemQMatmul4), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET_DOT, jax.ffi.pycapsule(lib.TandemQMatmul4Dot), platform="cpu")
        jax.ffi.register_ffi_target(_TARGET8_DOT, jax.ffi.pycapsule(lib.TandemQMatmul8Dot), platform="cpu")
        jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(lib.TandemAttention), platform="cpu")
        jax.ffi.register_ffi_target(_ATTENTION_WRITE, jax.ffi.pycapsule(lib.TandemAttentionWrite), platform="cpu")
        jax.ffi.register_ffi_target(_RMS_NORM, jax.ffi.pycapsule(lib.TandemRmsNorm), platform="cpu")
        jax.ffi.register_ffi_target(_ROPE_TABLES, jax.ffi.pycapsule(lib.TandemRopeTables), platform="cpu")
        jax.ffi.register_ffi_target(_ROPE, jax.ffi.pycapsule(lib.TandemRope), platform="cpu")
        jax.ffi.register_ffi_target(_ARGMAX, jax.ffi.pycapsule(lib.TandemArgmax), platform="cpu")
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("int8 product kernel off: building it failed (%s); products run in XLA on float32 weights", e)
        return False
    return True


def _unavailable_reason() -> str | None:
    if os.environ.get("TANDEM_QMATMUL", "1").lower() in ("0", "off", "false", "no"):
        return "TANDEM_QMATMUL=0"
    if jax.default_backend() != "cpu":
        return f"backend is {jax.default_backend()}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"machine is {platform.machine()}"
    flags = _cpu_flags()
    if flags is None:
        return "no /proc/cpuinfo"
    if not _AVX2.issubset(flags):
        return "the CPU lacks AVX2, FMA or F16C"
    return None


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (Linux's /proc/cpuinfo names), None where they cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def isa() -> str:
    """The build this machine loads: `$TANDEM_KERNEL_ISA` if set (one of `ISAS`), else the first of `ISAS` whose CPU
    flags this CPU has (AVX-512 VNNI's integer dot products, ~20% faster 8-bit-input products, where it has them).

    Raises:
        ValueError: `$TANDEM_KERNEL_ISA` names no build, or one this CPU cannot run.
    """
    flags = _cpu_flags() or frozenset()
    wanted = os.environ.get("TANDEM_KERNEL_ISA", "")
    if wanted:
        if wanted not in ISAS:
            raise ValueError(f"TANDEM_KERNEL_ISA={wanted!r}: expected one of {', '.join(ISAS)}")
        if not ISAS[wanted][0] <= flags:
            raise ValueError(f"TANDEM_KERNEL_ISA={wanted}: this CPU lacks {', '.join(sorted(ISAS[wanted][0] - flags))}")
        return wanted
    return next((name for name, (needs, _) in ISAS.items() if needs <= flags), "avx2")


def build_all() -> list[Path]:
    """Builds every build of the library into the kernel cache (a container image does, so that whichever CPU a pod
    lands on finds its build prebuilt)."""
    return [_build(name) for name in ISAS]


def _build(name: str) -> Path:
    """The compiled library of build `name` (one of `ISAS`), built once per source, jaxlib version and flags (atomic
    rename: safe across processes).

    A container image builds them where a compiler is (`docker/Dockerfile`) and ships the cache, so pods need none.
    """
    import jaxlib

    flags = (*_FLAGS, *ISAS[name][1])
    source = b"".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TANDEM_KERNEL_CACHE") or cache_root() / "kernels")
    lib = cache / f"qmatmul-{name}-{key}.so"
    if lib.exists():
        return lib
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError(f"no C++ compiler (g++ or c++) on PATH, and {lib} is not built")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        include = ["-I", jax.ffi.include_dir(), "-I", str(_SOURCES[0].parent)]
        cmd = [compiler, *flags, *include, *map(str, _SOURCES), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
        os.replace(out, lib)
    return lib
