"""A plain-NumPy Llama forward pass, written for clarity rather than speed, to check the JAX model and the loaders.

It follows the Hugging Face Llama definition step by step, in float64, over a whole sequence at once (no cache):

    h = embed[ids]
    for each layer:
        h = h + o_proj(attention(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))
        h = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
    logits = lm_head(rms(h))

RoPE is HF's rotate-half form: dimension j of a head pairs with dimension j + H/2, both rotated by the angle
pos * theta^(-2j/H).
"""

from __future__ import annotations

import numpy as np

from tandem.config import LlamaConfig


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. x: [T, D], weight: [D]."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE. x: [n_heads, T, H] at positions 0..T-1; returns the same shape."""
    _, t, h = x.shape
    inv_freq = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)  # [H/2]
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = np.concatenate([np.cos(angles), np.cos(angles)], axis=-1)  # [T, H]
    sin = np.concatenate([np.sin(angles), np.sin(angles)], axis=-1)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)  # rotate_half
    return x * cos + rotated * sin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def attention(config: LlamaConfig, w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Causal grouped-query self-attention of one layer. x: [T, D] (already normed) -> [T, D]."""
    t, h = x.shape[0], config.head_dim
    q = (x @ w["self_attn.q_proj.weight"].T).reshape(t, config.n_heads, h).transpose(1, 0, 2)  # [N, T, H]
    k = (x @ w["self_attn.k_proj.weight"].T).reshape(t, config.n_kv_heads, h).transpose(1, 0, 2)  # [K, T, H]
    v = (x @ w["self_attn.v_proj.weight"].T).reshape(t, config.n_kv_heads, h).transpose(1, 0, 2)  # [K, T, H]
    q, k = rope(q, config.rope_theta), rope(k, config.rope_theta)
    k = np.repeat(k, config.group_size, axis=0)  # query head n reads kv head n // group_size: [N, T, H]
    v = np.repeat(v, config.group_size, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(h)  # [N, T, T]
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    out = softmax(scores) @ v  # [N, T, H]
    out = out.transpose(1, 0, 2).reshape(t, config.n_heads * h)
    return out @ w["self_attn.o_proj.weight"].T


def mlp(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """SwiGLU. x: [T, D] (already normed) -> [T, D]."""
    gate = silu(x @ w["mlp.gate_proj.weight"].T)
    up = x @ w["mlp.up_proj.weight"].T
    return (gate * up) @ w["mlp.down_proj.weight"].T


def reference_forward(
    config: LlamaConfig, state_dict: dict[str, np.ndarray], token_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Run the model on one sequence from position 0.

    Args:
        config: Model shape.
        state_dict: HF-named weights (see tandem.formats.checkpoints).
        token_ids: [T] input ids.

    Returns:
        logits: [T, V] float64, next-token logits at every position.
        hidden: [n_layers + 1, T, D] float64; hidden[0] is the embeddings, hidden[l] the residual stream after layer l
            (before the final norm).
    """
    sd = {name: np.asarray(value, dtype=np.float64) for name, value in state_dict.items()}
    h = sd["model.embed_tokens.weight"][np.asarray(token_ids)]  # [T, D]
    hidden = [h]
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        w = {name[len(prefix) :]: value for name, value in sd.items() if name.startswith(prefix)}
        h = h + attention(config, w, rms_norm(h, w["input_layernorm.weight"], config.rms_eps))
        h = h + mlp(w, rms_norm(h, w["post_attention_layernorm.weight"], config.rms_eps))
        hidden.append(h)
    head = sd["model.embed_tokens.weight"] if config.tie_embeddings else sd["lm_head.weight"]
    logits = rms_norm(h, sd["model.norm.weight"], config.rms_eps) @ head.T
    return logits, np.stack(hidden)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter, restated: per head, HF row s*H/2 + j (half s, j < H/2) goes to row 2j + s."""
    rows = w.shape[0]
    h = rows // n_heads
    out = np.empty_like(w)
    for head in range(n_heads):
        for s in range(2):
            for j in range(h // 2):
                out[head * h + 2 * j + s] = w[head * h + s * h // 2 + j]
    return out
