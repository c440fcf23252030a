"""The adaptive-γ router (docs/design.md, Method): a 2-layer MLP that predicts, after each drafted token, whether the
primary agrees.

Inputs, from the drafter's distribution q at the drafted position: its entropy, its top-k probabilities and the
drafter's embeddings of those top-k tokens. Output: a confidence in [0, 1]; drafting continues while it is >= τ.
Training uses the soft label 1 - TV(q, p), with p the primary's distribution at the same position (the chance that
speculative sampling accepts the draft), and binary cross-entropy.

The same feature code runs under JAX for training and in NumPy for serving (one drafted token at a time).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from safetensors.numpy import load_file, save_file


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    top_k: int = 4  # top-k probabilities and token embeddings fed to the MLP
    d_embed: int = 256  # drafter width D (embedding size)
    hidden: int = 128  # MLP hidden width

    @property
    def n_features(self) -> int:
        return 1 + self.top_k + self.top_k * self.d_embed  # entropy, top-k probs, top-k embeddings


@struct.dataclass
class RouterParams:
    w1: jax.Array  # [F, hidden]
    b1: jax.Array  # [hidden]
    w2: jax.Array  # [hidden]
    b2: jax.Array  # []


def init_router(cfg: RouterConfig, seed: int = 0) -> RouterParams:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return RouterParams(
        w1=jax.random.normal(k1, (cfg.n_features, cfg.hidden)) * cfg.n_features**-0.5,
        b1=jnp.zeros((cfg.hidden,)),
        w2=jax.random.normal(k2, (cfg.hidden,)) * cfg.hidden**-0.5,
        b2=jnp.zeros(()),
    )


def features(logits: Any, embed: Any, top_k: int, xp: Any = jnp) -> Any:
    """Router inputs from drafter logits.

    Args:
        logits: [..., V] drafter logits (masked entries at -1e30 get probability 0).
        embed: [V, D] the drafter's token embedding.
        top_k: k.
        xp: jnp (training) or np (serving).

    Returns:
        [..., 1 + k + k * D] features: entropy, top-k probabilities (descending), top-k embeddings.
    """
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))
    p = xp.exp(logp)
    entropy = -xp.sum(xp.where(p > 0, p * logp, 0.0), axis=-1, keepdims=True)
    top_p: Any
    top_ids: Any
    if xp is jnp:
        top_p, top_ids = jax.lax.top_k(p, top_k)
    else:
        part = np.argpartition(-p, top_k - 1, axis=-1)[..., :top_k]
        order = np.argsort(-np.take_along_axis(p, part, axis=-1), axis=-1, kind="stable")
        top_ids = np.take_along_axis(part, order, -1)
        top_p = np.take_along_axis(p, top_ids, -1)
    emb = embed[top_ids]  # [..., k, D]
    return xp.concatenate([entropy, top_p, emb.reshape(*emb.shape[:-2], -1)], axis=-1)


def router_logit(params: Any, feats: Any, xp: Any = jnp) -> Any:
    """[..., F] features -> [...] logit of agreement (2-layer MLP, GELU)."""
    h = feats @ params.w1 + params.b1
    h = 0.5 * h * (1.0 + xp.tanh(0.7978845608 * (h + 0.044715 * h**3)))  # tanh-GELU, identical in jnp and np
    return h @ params.w2 + params.b2


def confidence(params: RouterParams | None, logits: jax.Array, embed: jax.Array, top_k: int) -> jax.Array:
    """[..., V] logits -> [...] the chance the primary agrees: the trained router's, or the paper's max-probability
    fallback (docs/design.md, Method) when params is None. embed: [V, D] the drafter's embedding rows for the V scored
    tokens."""
    if params is None:
        return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    return jax.nn.sigmoid(router_logit(params, features(logits, embed, top_k)))


def total_variation(logq: jax.Array, logp: jax.Array) -> jax.Array:
    """[..., V] log-distributions -> [...] TV distance 0.5 * sum |q - p|."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logq) - jnp.exp(logp)), axis=-1)


def router_loss(params: RouterParams, feats: jax.Array, agree: jax.Array) -> jax.Array:
    """Binary cross-entropy against the soft label agree = 1 - TV(q, p)."""
    z = router_logit(params, feats)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, agree))


def train_router(
    feats: np.ndarray, agree: np.ndarray, cfg: RouterConfig, *, steps: int = 2000, batch: int = 4096, seed: int = 0
) -> tuple[RouterParams, dict[str, float]]:
    """Fits the router on precomputed features [N, F] and soft labels [N] (AdamW, 1e-3).

    Returns:
        The params and {"loss": final training loss, "mae": mean |sigmoid(z) - label| on the training set}.
    """
    params = init_router(cfg, seed)
    opt = optax.adamw(1e-3, weight_decay=0.01)
    state = opt.init(params)

    @jax.jit
    def step(params: RouterParams, state: optax.OptState, x: jax.Array, y: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(router_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    x_all, y_all = jnp.asarray(feats, jnp.float32), jnp.asarray(agree, jnp.float32)
    loss = jnp.zeros(())
    for _ in range(steps):
        idx = jnp.asarray(rng.integers(0, feats.shape[0], size=min(batch, feats.shape[0])))
        params, state, loss = step(params, state, x_all[idx], y_all[idx])
    pred = jax.nn.sigmoid(router_logit(params, x_all))
    return params, {"loss": float(loss), "mae": float(jnp.mean(jnp.abs(pred - y_all)))}


class MLPRouter:
    """Serving side: NumPy features of one drafted position through the trained MLP (sampled requests, which draft
    step by step on the host); greedy requests draft on device and use `device_params` with `confidence`.

    Implements the `tandem.decoding.speculative.Router` protocol (structurally: the model layer does not import
    decoding)."""

    def __init__(self, cfg: RouterConfig, params: RouterParams, embed: np.ndarray) -> None:
        if embed.shape[1] != cfg.d_embed:
            raise ValueError(f"router expects drafter width {cfg.d_embed}, drafter embedding is {embed.shape}")
        self.cfg = cfg
        self.params: Any = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        self.embed = np.asarray(embed, np.float64)
        self.device_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)  # on-device drafting

    def confidence(self, draft_logits: np.ndarray) -> float:
        feats = features(np.asarray(draft_logits, np.float64), self.embed, self.cfg.top_k, xp=np)
        z = float(router_logit(self.params, feats, xp=np))
        return 1.0 / (1.0 + np.exp(-z))


def save_router(directory: Path, cfg: RouterConfig, params: RouterParams) -> None:
    """Writes `router.json` and `router.safetensors` into a drafter's directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "router.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    arrays = {f: np.asarray(getattr(params, f), np.float32) for f in ("w1", "b1", "w2", "b2")}
    save_file(arrays, str(directory / "router.safetensors"))


def load_router(directory: Path) -> tuple[RouterConfig, RouterParams] | None:
    """The router stored beside a drafter, or None when it has none."""
    if not (directory / "router.json").exists():
        return None
    cfg = RouterConfig(**json.loads((directory / "router.json").read_text()))
    t = load_file(str(directory / "router.safetensors"))
    return cfg, RouterParams(**{f: jnp.asarray(t[f]) for f in ("w1", "b1", "w2", "b2")})
