"""Checkpoint loaders for the Llama-architecture primary: GGUF and Hugging Face safetensors.

Every loader returns a `LlamaConfig` and a *state dict*: float32 NumPy arrays keyed by Hugging Face Llama names, in
Hugging Face layouts (linear weights are [out, in], applied as `x @ W.T`):

    model.embed_tokens.weight                         [V, D]
    model.norm.weight                                 [D]
    lm_head.weight                                    [V, D]   only when embeddings are untied
    model.layers.{i}.input_layernorm.weight           [D]
    model.layers.{i}.post_attention_layernorm.weight  [D]
    model.layers.{i}.self_attn.q_proj.weight          [N*H, D]
    model.layers.{i}.self_attn.k_proj.weight          [K*H, D]
    model.layers.{i}.self_attn.v_proj.weight          [K*H, D]
    model.layers.{i}.self_attn.o_proj.weight          [D, N*H]
    model.layers.{i}.mlp.gate_proj.weight             [F, D]
    model.layers.{i}.mlp.up_proj.weight               [F, D]
    model.layers.{i}.mlp.down_proj.weight             [D, F]

RoPE rotates each head's query/key as two halves (`rotate_half`): dimension j pairs with j + H/2. GGUF files from
llama.cpp's converter store q/k rows permuted for llama.cpp's interleaved layout, where dimension 2j pairs with 2j+1;
`load_gguf` undoes that permutation.

This module needs NumPy and the `gguf` package, not JAX.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import safetensors.numpy

from tandem.config import LlamaConfig

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a state dict for `config` holds, with its shape (see the module docstring)."""
    d, h, f, v = config.d_model, config.head_dim, config.ffn_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (config.n_heads * h, d)
        shapes[p + "self_attn.k_proj.weight"] = (config.n_kv_heads * h, d)
        shapes[p + "self_attn.v_proj.weight"] = (config.n_kv_heads * h, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, config.n_heads * h)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    return shapes


def check_state_dict(config: LlamaConfig, state_dict: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless `state_dict` holds exactly the parameters of `config`, with the right shapes."""
    shapes = llama_param_shapes(config)
    missing = sorted(shapes.keys() - state_dict.keys())
    extra = sorted(state_dict.keys() - shapes.keys())
    if missing or extra:
        raise ValueError(f"state dict does not match config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)}, expected {shape}")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, giving Hugging Face's rotate-half layout.

    Within each head of size H, llama.cpp's converter moves HF row `s * H/2 + j` (half s in {0, 1}, j < H/2) to row
    `2 * j + s`: rows viewed as [n_heads, 2, H/2, in] are transposed to [n_heads, H/2, 2, in]. The inverse views
    rows as [n_heads, H/2, 2, in] and transposes back.

    Args:
        w: [n_heads * H, in] weight in GGUF row order (H even).
        n_heads: Heads the rows split into (query heads for q, key/value heads for k).

    Returns:
        [n_heads * H, in] weight in HF row order.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32_value(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True))


def gguf_config(reader: gguf.GGUFReader) -> LlamaConfig:
    """Read a `LlamaConfig` from a GGUF file's `llama.*` and `tokenizer.ggml.*` metadata.

    Args:
        reader: An open GGUF file.

    Returns:
        The model's config; `tie_embeddings` is True when the file has no `output.weight` tensor.

    Raises:
        ValueError: The file is not a plain Llama (other architecture, partial rotary, RoPE scaling, experts).
    """
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
    if _gguf_field(reader, "llama.expert_count", 0):
        raise ValueError("mixture-of-experts GGUF files are not supported")
    if _gguf_field(reader, "llama.rope.scaling.type", "none") != "none":
        raise ValueError("GGUF files with RoPE scaling are not supported")

    def req(key: str) -> Any:
        value = _gguf_field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    d_model = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    head_dim = int(_gguf_field(reader, "llama.attention.key_length", d_model // n_heads))
    rope_dim = int(_gguf_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) are not supported")
    vocab_size = _gguf_field(reader, "llama.vocab_size")
    if vocab_size is None:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    defaults = LlamaConfig()
    return LlamaConfig(
        vocab_size=int(vocab_size),
        d_model=d_model,
        n_layers=int(req("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(req("feed_forward_length")),
        rope_theta=_float32_value(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=_float32_value(req("attention.layer_norm_rms_epsilon")),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_seq_len=int(req("context_length")),
        bos_token_id=int(_gguf_field(reader, "tokenizer.ggml.bos_token_id", defaults.bos_token_id)),
        eos_token_id=int(_gguf_field(reader, "tokenizer.ggml.eos_token_id", defaults.eos_token_id)),
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER[parts[2]]}.weight"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def load_gguf(
    source: str | Path | gguf.GGUFReader, only: Collection[str] | None = None
) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Load a llama.cpp GGUF file as a config and a float32 state dict in HF names and layouts.

    Every tensor is dequantized with the `gguf` package's own routines (Q4_1, Q8_0, F16, F32, ... as stored), and the
    q/k projections are un-permuted back to HF's rotate-half row order (`unpermute_rope_rows`).

    Args:
        source: Path of a `.gguf` file, or an already open `gguf.GGUFReader` (opening costs a few seconds).
        only: HF names to load (e.g. the drafter service needs just `model.embed_tokens.weight`); None loads all.

    Returns:
        `(config, state_dict)`; see the module docstring for names and shapes.

    Raises:
        ValueError: Unsupported architecture or unexpected tensors.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    config = gguf_config(reader)
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if only is not None and name not in only:
            continue
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        state[name] = np.array(_hf_rows(w, name, config), dtype=np.float32, order="C")  # own it, not the file's mmap
    if only is None:
        check_state_dict(config, state)
    elif missing := set(only) - set(state):
        raise ValueError(f"GGUF has no tensors {sorted(missing)}")
    return config, state


def _hf_rows(w: np.ndarray, name: str, config: LlamaConfig) -> np.ndarray:
    """A GGUF matrix (or per-row data such as block scales) in HF row order: q/k rows un-permuted."""
    if name.endswith("q_proj.weight"):
        return unpermute_rope_rows(w, config.n_heads)
    if name.endswith("k_proj.weight"):
        return unpermute_rope_rows(w, config.n_kv_heads)
    return w


QuantBlocks = tuple[np.ndarray, np.ndarray, np.ndarray]  # q [O, I] int8, scale [O, I/32], offset [O, I/32] float32


def gguf_quant_blocks(source: str | Path | gguf.GGUFReader) -> dict[str, QuantBlocks]:
    """The Q8_0 and Q4_1 matrices of a GGUF file as integers with per-block scales, in HF names and row order.

    Each row's 32-input block b holds weights scale[row, b] * q + offset[row, b] (Q8_0: float16 d and signed 8-bit q,
    offset 0; Q4_1: float16 d and m, q in 0..15), which `tandem.model.kernels.dequantize` turns back into exactly the
    float32 weights `load_gguf` returns. Tensors stored any other way are left out.

    Returns:
        {HF name: (q [O, I] int8, scale [O, I/32] float32, offset [O, I/32] float32)}.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    config = gguf_config(reader)
    out: dict[str, QuantBlocks] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind not in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
            continue
        name = _hf_name(tensor.name)
        rows = int(tensor.shape[-1])
        _, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, block_bytes)  # [O, I/32, bytes per block]
        scale = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == gguf.GGMLQuantizationType.Q8_0:  # half d, int8 qs[32]
            offset = np.zeros_like(scale)
            q = raw[..., 2:].copy().view(np.int8)
        else:  # half d, half m, uint8 qs[16]: element j is qs[j] & 15, element j + 16 is qs[j] >> 4
            offset = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            nibbles = raw[..., 4:]
            q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.int8)
        q, scale, offset = (
            np.ascontiguousarray(_hf_rows(a, name, config)) for a in (q.reshape(rows, -1), scale, offset)
        )
        out[name] = (q, scale, offset)
    return out


# ----------------------------------------------------------------------------------------------- HF safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a .safetensors file as float32 arrays. Parsed by hand because NumPy has no bfloat16."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        raw = data[begin:end].view(_ST_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        if meta["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = raw.astype(np.float32)
    return out


def hf_config(d: dict[str, Any]) -> LlamaConfig:
    """Convert a Hugging Face Llama `config.json` dict to a `LlamaConfig`.

    Raises:
        ValueError: Anything this project's Llama does not implement (scaled RoPE, biases, another activation or
            model type).
    """
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"expected model_type 'llama', got {d.get('model_type')!r}")
    # Older configs say `rope_theta` + `rope_scaling`; newer ones `rope_parameters` with a `rope_type`.
    rope = d.get("rope_parameters") or {}
    for key, value in (("rope_scaling", d.get("rope_scaling")), ("rope_parameters", rope)):
        if value and value.get("rope_type", value.get("type", "default")) != "default":
            raise ValueError(f"{key}={value!r} is not supported (plain RoPE only)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("attention/MLP biases are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (only silu)")

    def first(x: Any) -> Any:
        return x[0] if isinstance(x, list) else x

    defaults = LlamaConfig()
    n_heads = int(d["num_attention_heads"])
    bos, eos = first(d.get("bos_token_id")), first(d.get("eos_token_id"))
    return LlamaConfig(
        vocab_size=int(d["vocab_size"]),
        d_model=int(d["hidden_size"]),
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // n_heads),
        ffn_dim=int(d["intermediate_size"]),
        rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_seq_len=int(d.get("max_position_embeddings", defaults.max_seq_len)),
        bos_token_id=defaults.bos_token_id if bos is None else int(bos),
        eos_token_id=defaults.eos_token_id if eos is None else int(eos),
    )


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face Llama config of `config` (the inverse of `hf_config`): plain RoPE, SiLU, no biases."""
    return {
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "rope_theta": config.rope_theta,  # older readers; newer ones read rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_seq_len,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "attention_bias": False,
        "mlp_bias": False,
    }


def load_hf_safetensors(directory: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Load a Hugging Face Llama checkpoint directory (`config.json` + `model.safetensors` or a sharded index).

    Args:
        directory: Holds `config.json` and either `model.safetensors` or `model.safetensors.index.json` and shards.

    Returns:
        `(config, state_dict)` with float32 arrays (F32, F16 and BF16 files are accepted). A tied checkpoint's
        redundant `lm_head.weight` and non-parameter buffers (`rotary_emb.inv_freq`) are dropped.

    Raises:
        ValueError: Unsupported config, or tensors missing / unexpected / misshapen.
    """
    directory = Path(directory)
    config = hf_config(json.loads((directory / "config.json").read_text()))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, np.ndarray] = {}
    for name in files:
        state.update(_read_safetensors(directory / name))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_state_dict(config, state)
    return config, state


def save_hf_safetensors(directory: str | Path, config: LlamaConfig, state_dict: dict[str, np.ndarray]) -> None:
    """Write a Hugging Face-style Llama checkpoint (`config.json` + float32 `model.safetensors`).

    Args:
        directory: Created if missing.
        config: Model shape.
        state_dict: Parameters as in the module docstring.
    """
    check_state_dict(config, state_dict)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = {"architectures": ["LlamaForCausalLM"], **hf_config_dict(config), "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def random_llama_state(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random float32 state dict for `config`, for tests: matrices ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.1^2).

    Args:
        config: Model shape (keep it tiny).
        seed: NumPy generator seed.

    Returns:
        State dict with the names and shapes of `llama_param_shapes(config)`.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in llama_param_shapes(config).items():
        if len(shape) == 1:
            state[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return state
