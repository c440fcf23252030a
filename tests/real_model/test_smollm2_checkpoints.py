"""The real SmolLM2 GGUF: its config and shapes, a reference forward pass that needs the q/k un-permutation, and
logits that match Hugging Face transformers'."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from reference_numpy import llama_cpp_permute, reference_forward

from tandem.config import LlamaConfig
from tandem.formats import assets
from tandem.formats.checkpoints import llama_param_shapes, load_gguf
from tandem.formats.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2() -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
    reader = gguf.GGUFReader(assets.smollm2_gguf_path())
    config, state = load_gguf(reader)
    return config, state, Tokenizer.from_gguf(reader)


@pytest.mark.real_model
def test_real_gguf_config_and_shapes(smollm2: tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]) -> None:
    config, state, _ = smollm2
    assert config == LlamaConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        rope_theta=100000.0,
        rms_eps=1e-5,
        tie_embeddings=True,
        max_seq_len=8192,
        bos_token_id=1,
        eos_token_id=2,
    )
    assert {k: v.shape for k, v in state.items()} == llama_param_shapes(config)
    assert len(state) == 2 + 9 * 30 and "lm_head.weight" not in state
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())


@pytest.mark.real_model
def test_real_model_knows_the_capital_of_france(
    smollm2: tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer],
) -> None:
    """Only right if the q/k rows are un-permuted: with llama.cpp's order, RoPE would pair the wrong dimensions."""
    config, state, tok = smollm2
    ids = tok.encode("The capital of France is")
    logits, hidden = reference_forward(config, state, ids)
    assert logits.shape == (len(ids), config.vocab_size)
    assert hidden.shape == (config.n_layers + 1, len(ids), config.d_model)
    assert tok.decode([int(np.argmax(logits[-1]))]) == " Paris"


def _mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under next-token logits [T, V]."""
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


@pytest.mark.real_model
def test_real_model_needs_the_unpermute(smollm2: tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]) -> None:
    """Control experiment: with q/k left in llama.cpp's row order the model gets measurably worse.

    (The France prompt alone does not show it: five tokens are too few for RoPE to matter, and the scrambled model
    still says " Paris". An order-dependent prompt does.)
    """
    config, state, tok = smollm2
    scrambled = dict(state)
    for i in range(config.n_layers):
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        scrambled[q] = llama_cpp_permute(state[q], config.n_heads)
        scrambled[k] = llama_cpp_permute(state[k], config.n_kv_heads)
    ids = tok.encode("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday,")
    right, _ = reference_forward(config, state, ids)
    wrong, _ = reference_forward(config, scrambled, ids)
    assert tok.decode([int(right[-1].argmax())]) == " Sunday"
    assert tok.decode([int(wrong[-1].argmax())]) != " Sunday"
    assert _mean_nll(right, ids) < _mean_nll(wrong, ids) - 0.5  # about 1.13 vs 2.15 nats


# Last-position logits of Hugging Face transformers 5.23 (torch, float32) loading this same GGUF file: its own
# dequantization and its own q/k un-permutation. Our weights matched its state dict exactly; logits agree to ~1e-4.
TRANSFORMERS_LOGITS = {
    "The capital of France is": {7042: 17.3713, 260: 14.8886, 4528: 13.2450, 2250: 13.0095, 1315: 12.9515},
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday,": {
        10528: 18.2558,
        284: 17.1048,
        12397: 15.7141,
        355: 13.8836,
        198: 13.5802,
    },
}


@pytest.mark.real_model
@pytest.mark.parametrize("prompt", list(TRANSFORMERS_LOGITS))
def test_real_model_matches_transformers(
    smollm2: tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer], prompt: str
) -> None:
    config, state, tok = smollm2
    logits, _ = reference_forward(config, state, tok.encode(prompt))
    expected = TRANSFORMERS_LOGITS[prompt]
    assert [int(i) for i in np.argsort(-logits[-1])[:5]] == list(expected)
    np.testing.assert_allclose(logits[-1, list(expected)], list(expected.values()), atol=2e-3)
