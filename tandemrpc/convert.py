"""Conversions between wire messages and the library's dataclasses, validating everything that arrives."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tandem.config import MODES, SamplingParams
from tandem.decoding.speculative import SparseDist
from tandem.errors import InvalidRequestError
from tandemrpc.v1 import tandem_pb2 as pb

MAX_TENSOR_ELEMENTS = 1 << 26  # 256 MB of float32: far above any real block, far below a memory blow-up

_DTYPES: dict[int, np.dtype] = {pb.Tensor.FLOAT32: np.dtype("<f4"), pb.Tensor.FLOAT16: np.dtype("<f2")}

MODE_NAMES: dict[int, str] = {
    pb.MODE_UNSPECIFIED: "tandem-speed",
    pb.MODE_PRIMARY: "primary",
    pb.MODE_SPEED: "speed",
    pb.MODE_TANDEM: "tandem",
    pb.MODE_TANDEM_SPEED: "tandem-speed",
}
FINISH_ENUMS: dict[str, int] = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
FINISH_NAMES: dict[int, str] = {value: name for name, value in FINISH_ENUMS.items()}
MODE_ENUMS: dict[str, int] = {name: value for value, name in MODE_NAMES.items() if value != pb.MODE_UNSPECIFIED}
assert set(MODE_ENUMS) == set(MODES)


def tensor_to_numpy(t: pb.Tensor, expect_shape: Sequence[int] | None = None, what: str = "tensor") -> np.ndarray:
    """Decodes a Tensor into a float32 array after checking dtype, shape, byte length and finiteness.

    Raises:
        InvalidRequestError: naming `what` and the problem.
    """
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidRequestError(f"{what}: unsupported dtype {t.dtype}; use FLOAT32 or FLOAT16")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{what}: negative dimension in shape {shape}")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n > MAX_TENSOR_ELEMENTS:
        raise InvalidRequestError(f"{what}: {n} elements exceed the limit of {MAX_TENSOR_ELEMENTS}")
    if len(t.data) != n * dtype.itemsize:
        raise InvalidRequestError(f"{what}: shape {shape} needs {n * dtype.itemsize} bytes, got {len(t.data)}")
    if expect_shape is not None and shape != tuple(expect_shape):
        raise InvalidRequestError(f"{what}: expected shape {tuple(expect_shape)}, got {shape}")
    arr = np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise InvalidRequestError(f"{what}: contains NaN or Inf")
    return arr


def numpy_to_tensor(a: np.ndarray, dtype: pb.Tensor.DType = pb.Tensor.FLOAT32) -> pb.Tensor:
    data = np.ascontiguousarray(a, dtype=_DTYPES[dtype]).tobytes()
    return pb.Tensor(dtype=dtype, shape=list(a.shape), data=data)


def optional_tensor(t: pb.Tensor, has: bool, what: str) -> np.ndarray | None:
    """A tensor field that may be absent (None when not set)."""
    return tensor_to_numpy(t, what=what) if has else None


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=float(p.temperature),
            top_k=int(p.top_k),
            top_p=float(p.top_p) if p.top_p != 0 else 1.0,
            seed=int(p.seed) if p.HasField("seed") else None,
        )
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


def sampling_to_proto(s: SamplingParams) -> pb.SamplingParams:
    out = pb.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    if s.seed is not None:
        out.seed = s.seed
    return out


def sparse_from_proto(d: pb.SparseDistribution, vocab_size: int) -> SparseDist:
    ids = np.asarray(d.token_ids, dtype=np.int64)
    probs = np.asarray(d.probs, dtype=np.float64)
    if ids.size == 0 or ids.size != probs.size:
        raise InvalidRequestError("a proposal needs as many probabilities as token ids (at least one)")
    if ids.min() < 0 or ids.max() >= vocab_size or np.unique(ids).size != ids.size:
        raise InvalidRequestError(f"proposal token ids must be distinct and lie in [0, {vocab_size})")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or abs(probs.sum() - 1.0) > 1e-3:
        raise InvalidRequestError("proposal probabilities must be finite, >= 0 and sum to 1")
    return SparseDist(ids=ids, probs=probs / probs.sum())


def sparse_to_proto(q: SparseDist) -> pb.SparseDistribution:
    return pb.SparseDistribution(token_ids=q.ids.tolist(), probs=q.probs.tolist())


def mode_name(mode: int) -> str:
    name = MODE_NAMES.get(mode)
    if name is None:
        raise InvalidRequestError(f"unknown mode {mode}; expected one of {', '.join(MODES)}")
    return name
