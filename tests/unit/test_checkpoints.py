"""Checkpoint loaders: HF safetensors round trips, GGUF reading, the q/k un-permutation, the real SmolLM2 file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy
from reference_numpy import llama_cpp_permute

from tandem.config import LlamaConfig
from tandem.formats import assets
from tandem.formats.checkpoints import (
    gguf_config,
    hf_config,
    hf_config_dict,
    llama_param_shapes,
    load_gguf,
    load_hf_safetensors,
    random_llama_state,
    save_hf_safetensors,
    unpermute_rope_rows,
)

TINY = LlamaConfig(
    vocab_size=64,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=96,
    rope_theta=10000.0,
    rms_eps=1e-6,
    tie_embeddings=True,
    max_seq_len=128,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_UNTIED = LlamaConfig(**{**TINY.to_dict(), "tie_embeddings": False, "n_kv_heads": 4})


# ------------------------------------------------------------------------------------------------ HF format


@pytest.mark.parametrize("config", [TINY, TINY_UNTIED], ids=["tied", "untied"])
def test_hf_round_trip(tmp_path: Path, config: LlamaConfig) -> None:
    state = random_llama_state(config, seed=3)
    save_hf_safetensors(tmp_path, config, state)
    loaded_config, loaded = load_hf_safetensors(tmp_path)
    assert loaded_config == config
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value)


def test_random_state_shapes() -> None:
    state = random_llama_state(TINY_UNTIED, seed=0)
    assert {k: v.shape for k, v in state.items()} == llama_param_shapes(TINY_UNTIED)
    assert "lm_head.weight" in state and "lm_head.weight" not in random_llama_state(TINY)
    assert abs(float(state["model.layers.0.mlp.up_proj.weight"].std()) - 0.02) < 0.005
    assert abs(float(state["model.norm.weight"].mean()) - 1.0) < 0.1


def _write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write a safetensors file by hand with bfloat16 data (truncated float32), which NumPy cannot hold."""
    header: dict[str, dict] = {}
    blobs, offset = [], 0
    for name, value in tensors.items():
        blob = (np.ascontiguousarray(value, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_hf_sharded_bf16_f16(tmp_path: Path) -> None:
    state = random_llama_state(TINY, seed=1)
    save_hf_safetensors(tmp_path, TINY, state)  # for config.json
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    _write_bf16_safetensors(tmp_path / "a.safetensors", {n: state[n] for n in first})
    safetensors.numpy.save_file({n: state[n].astype(np.float16) for n in second}, str(tmp_path / "b.safetensors"))
    weight_map = {n: "a.safetensors" for n in first} | {n: "b.safetensors" for n in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config, loaded = load_hf_safetensors(tmp_path)
    assert config == TINY and loaded.keys() == state.keys()
    for n in first:  # bfloat16 keeps 8 mantissa bits
        np.testing.assert_allclose(loaded[n], state[n], rtol=2**-7)
    for n in second:
        np.testing.assert_array_equal(loaded[n], state[n].astype(np.float16).astype(np.float32))


def test_hf_config_parsing() -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        "bos_token_id": 5,
        "eos_token_id": [7, 8],
    }
    config = hf_config(base)
    assert (config.head_dim, config.eos_token_id, config.bos_token_id, config.rope_theta) == (16, 7, 5, 500000.0)
    assert hf_config({**base, "head_dim": 32}).head_dim == 32
    newer = {k: v for k, v in base.items() if k != "rope_theta"}
    newer["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert hf_config(newer).rope_theta == 1234.0
    assert hf_config(hf_config_dict(config)) == config  # the writer's dict reads back as the same config
    for bad in [
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}},
        {"attention_bias": True},
        {"mlp_bias": True},
        {"hidden_act": "gelu"},
        {"model_type": "qwen2"},
    ]:
        with pytest.raises(ValueError):
            hf_config({**base, **bad})


def test_hf_rejects_wrong_tensors(tmp_path: Path) -> None:
    state = random_llama_state(TINY, seed=0)
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="unexpected"):
        save_hf_safetensors(tmp_path, TINY, state)


# --------------------------------------------------------------------------------------- q/k un-permutation


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_heads: int) -> None:
    w = np.random.default_rng(n_heads).standard_normal((n_heads * 64, 40))
    permuted = llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_heads), w)


def _rope_rotate_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """HF RoPE on one head vector [H]: dimension j pairs with j + H/2."""
    h = x.shape[0]
    ang = pos * theta ** (-np.arange(0, h, 2) / h)
    a, b = x[: h // 2], x[h // 2 :]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)])


def _rope_interleaved(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's "normal" RoPE on one head vector [H]: dimension 2j pairs with 2j + 1."""
    h = x.shape[0]
    ang = pos * theta ** (-np.arange(0, h, 2) / h)
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return out


def test_permutation_turns_rotate_half_into_interleaved_rope() -> None:
    """Why the permutation exists: interleaved RoPE on permuted rows == rotate-half RoPE on HF rows, row for row."""
    rng = np.random.default_rng(0)
    n_heads, h = 3, 16
    w = rng.standard_normal((n_heads * h, 24))
    x = rng.standard_normal(24)
    hf_q, gguf_q = (w @ x).reshape(n_heads, h), (llama_cpp_permute(w, n_heads) @ x).reshape(n_heads, h)
    for head in range(n_heads):
        hf_rot = _rope_rotate_half(hf_q[head], pos=5, theta=10000.0)
        gguf_rot = _rope_interleaved(gguf_q[head], pos=5, theta=10000.0)
        np.testing.assert_allclose(unpermute_rope_rows(gguf_rot[:, None], 1)[:, 0], hf_rot, atol=1e-12)


# ------------------------------------------------------------------------------------------------- GGUF

_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path: Path, config: LlamaConfig, state: dict[str, np.ndarray], q8_embeddings: bool) -> None:
    """Write `state` as llama.cpp would: GGUF names, q/k rows permuted, optionally a Q8_0 token embedding."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for name, value in state.items():
        if name == "model.embed_tokens.weight":
            if q8_embeddings:
                q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                value = llama_cpp_permute(value, config.n_heads)
            elif rest.startswith("self_attn.k_proj"):
                value = llama_cpp_permute(value, config.n_kv_heads)
        writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("config", [TINY, TINY_UNTIED], ids=["tied", "untied"])
def test_gguf_tiny_round_trip(tmp_path: Path, config: LlamaConfig) -> None:
    state = random_llama_state(config, seed=7)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, state, q8_embeddings=True)
    loaded_config, loaded = load_gguf(path)
    assert loaded_config == config
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert loaded[name].dtype == np.float32 and loaded[name].flags.writeable
        if name == "model.embed_tokens.weight":  # Q8_0: one scale per 32 values, 8-bit codes
            np.testing.assert_allclose(loaded[name], value, atol=float(np.abs(value).max()) / 100)
        else:
            np.testing.assert_array_equal(loaded[name], value)


def test_gguf_rejects_other_architectures(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture"):
        gguf_config(gguf.GGUFReader(tmp_path / "x.gguf"))


# ------------------------------------------------------------------------------------------------ assets


def test_assets_cache_dir_and_bad_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("TANDEM_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "tandem"
    wheels = tmp_path / "arg" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / assets.WHEEL_NAME).write_bytes(b"not the wheel")  # present, so no download is attempted
    with pytest.raises(RuntimeError, match="sha256"):
        assets.smollm2_gguf_path(tmp_path / "arg")
