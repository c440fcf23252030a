"""Evaluation of drafters against the frozen primary on held-out text.

Two families of figures:
    * The paper's Table 1 (docs/design.md, Method) on teacher-forced windows with the training round mask (γ = 2):
      next-token accuracy against the text, top-1 agreement with the primary, total-variation distance to the primary,
      cross-entropy on the text.
    * Greedy SPEED mean acceptance length (1 + accepted / rounds; docs/design.md, Metric definitions) at fixed γ and
      with the adaptive router. Greedy SPEED is deterministic, so it is computed exactly without running rounds one by
      one: the primary's greedy continuation of each prompt is generated once; a round that starts at position m
      drafts from the primary's states of positions < m and its own states from m on, which is
      `tandem.model.drafter.train_forward` with a round starting at m (`offset`); while drafts match the continuation
      the drafter is fed exactly the continuation, so the accepted prefix and the τ stops before the first mismatch are
      those of a real run.
      (tests/unit/test_train.py::test_speed_simulation_equals_the_engine checks the simulation against the engine.)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tandem.config import DrafterConfig, LlamaConfig
from tandem.model import drafter as drafter_model
from tandem.model.drafter import DrafterParams
from tandem.model.primary import LlamaParams, PrimaryRunner, forward_sequence
from tandem.model.router import RouterConfig, RouterParams, confidence, total_variation


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` measures and on how much text."""

    seq_len: int = 256  # tokens per teacher-forced window
    windows: int = 64  # windows for the Table 1 metrics (evenly spaced over the text)
    block_len: int = 2  # γ of the round mask for the Table 1 metrics (the training γ)
    prompts: int = 24  # prompts for acceptance (prefixes of evenly spaced windows)
    prompt_len: int = 64  # tokens per prompt
    max_new: int = 64  # greedy tokens generated per prompt
    gammas: tuple[int, ...] = (2, 4, 6, 8)  # fixed draft lengths
    tau: float = 0.8  # adaptive: keep drafting while the router's confidence >= τ
    gamma_max: int = 16  # adaptive: most drafts per round
    batch: int = 8  # sequences per forward pass


@struct.dataclass
class Drafter:
    """A drafter under evaluation: config, runnable params and optionally its router (a pytree for jit)."""

    cfg: DrafterConfig = struct.field(pytree_node=False)
    params: DrafterParams
    router_params: RouterParams | None = None
    router_cfg: RouterConfig | None = struct.field(pytree_node=False, default=None)


def evenly_spaced_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """[count, length] windows spread evenly over a flat token array (fewer if the text is short)."""
    if tokens.shape[0] < length:
        raise ValueError(f"text has {tokens.shape[0]} tokens, fewer than one window of {length}")
    count = min(count, tokens.shape[0] // length)
    starts = np.linspace(0, tokens.shape[0] - length, count).astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + length], dtype=np.int32) for s in starts])


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def confidence_fn(d: Drafter) -> Callable[[jax.Array], jax.Array]:
    """[..., V] logits -> [...] the router's confidence (max probability without a trained router)."""
    top_k = d.router_cfg.top_k if d.router_cfg is not None else 0
    embed = d.params.embed
    assert embed is not None, "call materialize() first"
    return lambda logits: confidence(d.router_params, logits, embed, top_k)


def table_metrics(
    pcfg: LlamaConfig, pparams: LlamaParams, drafters: dict[str, Drafter], windows: np.ndarray, cfg: EvalConfig
) -> dict[str, dict[str, float]]:
    """The paper's Table 1 per drafter (docs/design.md, Method): accuracy, agreement (percent), tv, ce over
    teacher-forced windows [N, T].

    The drafter's full-vocabulary distribution is scored (a restricted draft head is a serving choice; with it, CE on
    tokens outside the head would be infinite). Acceptance lengths use the head as served.
    """
    taps = next((d.cfg.tapped_layers for d in drafters.values() if d.cfg.tandem), ())
    full = {n: dataclasses.replace(d.params, head=None, head_ids=None) for n, d in drafters.items()}

    @jax.jit  # weights are arguments, not closure constants (XLA would constant-fold them)
    def one(pparams: LlamaParams, full: dict[str, DrafterParams], tokens: jax.Array) -> dict[str, dict[str, jax.Array]]:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        p_logits, hidden = forward_sequence(pparams, inputs, cfg=pcfg, taps=taps)
        logp = jax.nn.log_softmax(p_logits, axis=-1)
        out = {}
        for name, d in drafters.items():
            logits = drafter_model.train_forward(
                full[name], d.cfg, inputs, hidden if d.cfg.tandem else None, cfg.block_len
            )
            logq = jax.nn.log_softmax(logits, axis=-1)
            guess = jnp.argmax(logits, axis=-1)
            out[name] = {
                "accuracy": jnp.sum(guess == targets),
                "agreement": jnp.sum(guess == jnp.argmax(logp, axis=-1)),
                "tv": jnp.sum(total_variation(logq, logp)),
                "ce": -jnp.sum(jnp.take_along_axis(logq, targets[..., None], axis=-1)),
            }
        return out

    sums: dict[str, dict[str, float]] = {n: {"accuracy": 0.0, "agreement": 0.0, "tv": 0.0, "ce": 0.0} for n in drafters}
    count = 0
    for b in _batches(windows, cfg.batch):
        res = one(pparams, full, jnp.asarray(b))
        count += b.shape[0] * (b.shape[1] - 1)
        for n in drafters:
            for k in sums[n]:
                sums[n][k] += float(res[n][k])
    return {
        n: {
            "accuracy": 100 * s["accuracy"] / count,
            "agreement": 100 * s["agreement"] / count,
            "tv": s["tv"] / count,
            "ce": s["ce"] / count,
            "positions": count,
        }
        for n, s in sums.items()
    }


def greedy_continuations(
    pcfg: LlamaConfig, pparams: LlamaParams, prompts: np.ndarray, max_new: int, eos: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """The primary's greedy continuation of each prompt, all rows in one batch.

    Args:
        pcfg, pparams: the primary.
        prompts: [B, P] prompts of equal length.
        max_new: tokens to generate per row.
        eos: tokens that end a row (the row's length stops before them).

    Returns:
        (sequences [B, P + max_new], lengths [B]: prompt plus generated tokens before any EOS).
    """
    b, p = prompts.shape
    runner = PrimaryRunner(pcfg, pparams, batch=b, max_len=p + max_new + 1)
    out = np.zeros((b, p + max_new), dtype=np.int32)
    out[:, :p] = prompts
    feed = prompts
    for i in range(max_new):
        logits = runner.forward(feed).logits[:, -1]
        for row in range(b):
            runner.commit(row, feed.shape[1])
        out[:, p + i] = np.argmax(logits, axis=-1)
        feed = out[:, p + i : p + i + 1]
    lengths = np.full(b, p + max_new)
    for row in range(b):
        hits = np.nonzero(np.isin(out[row, p:], list(eos)))[0]
        if hits.size:
            lengths[row] = p + int(hits[0])
    return out, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "taps"))
def _primary_states(pparams: LlamaParams, tokens: jax.Array, *, cfg: LlamaConfig, taps: tuple[int, ...]) -> jax.Array:
    return forward_sequence(pparams, tokens, cfg=cfg, taps=taps)[1]


@functools.partial(jax.jit, static_argnames=("block",))
def _round_greedy(
    d: Drafter, tokens: jax.Array, hidden: jax.Array | None, offset: jax.Array, *, block: int
) -> tuple[jax.Array, jax.Array]:
    """Argmax and confidence at every position with rounds of `block` starting at offset + n * block."""
    logits = drafter_model.train_forward(d.params, d.cfg, tokens, hidden, block, offset)
    return jnp.argmax(logits, axis=-1), confidence_fn(d)(logits)


def round_predictions(
    pcfg: LlamaConfig, pparams: LlamaParams, d: Drafter, seqs: np.ndarray, block: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy drafts and confidences of a round starting at every position.

    Returns:
        (preds, conf), each [B, T, block]: entry [b, m, j] is the drafter's argmax (and router confidence) at position
        m + j of row b when a round starts at m and the drafter is fed the sequence itself.
    """
    b, t = seqs.shape
    preds = np.zeros((b, t, block), dtype=np.int32)
    conf = np.zeros((b, t, block), dtype=np.float32)
    for lo in range(0, b, batch):
        rows = jnp.asarray(seqs[lo : lo + batch])
        hidden = _primary_states(pparams, rows, cfg=pcfg, taps=d.cfg.tapped_layers) if d.cfg.tandem else None
        for offset in range(block):  # the primary's states are shared by every offset
            g, c = _round_greedy(d, rows, hidden, jnp.int32(offset), block=block)
            g, c = np.asarray(g), np.asarray(c)
            for m in range(offset, t, block):  # rounds of this offset start at m; their positions are m .. m+block-1
                n = min(block, t - m)
                preds[lo : lo + batch, m, :n] = g[:, m : m + n]
                conf[lo : lo + batch, m, :n] = c[:, m : m + n]
    return preds, conf


@dataclasses.dataclass
class SpeedStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    declined: int = 0  # rounds the router declined (τ_first): one-token primary steps
    blocks: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)  # verify size -> rounds

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted / max(self.rounds, 1)

    def add(self, other: SpeedStats) -> None:
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.declined += other.declined
        self.blocks.update(other.blocks)


@dataclasses.dataclass(frozen=True)
class RoundCosts:
    """A cost model of greedy SPEED on one machine, in units of a one-token primary step (measured by `tandem tune`).

    Attributes:
        verify: verify[k - 1] is a primary pass over k tokens; longer blocks cost the last entry.
        drafter_step: one drafter step (a round of k drafts takes k; a declined round takes one).
    """

    verify: tuple[float, ...]
    drafter_step: float

    def block(self, k: int) -> float:
        return self.verify[min(k, len(self.verify)) - 1]

    def relative_speed(self, stats: SpeedStats) -> float:
        """Tokens per unit of time over the primary alone's (one token per one-token step)."""
        tokens = stats.rounds + stats.accepted + stats.declined
        cost = sum(n * self.block(k) for k, n in stats.blocks.items()) + stats.declined * self.block(1)
        cost += self.drafter_step * (stats.drafted + stats.declined)
        return tokens / cost if cost else 1.0


def simulate_greedy_speed(
    preds: np.ndarray,
    conf: np.ndarray,
    seq: np.ndarray,
    start: int,
    end: int,
    gamma: int,
    tau: float,
    tau_first: float = 0.0,
) -> SpeedStats:
    """Replays `tandem.decoding.rounds.run_request` for one greedy request whose primary output is seq[start:end].

    Args:
        preds, conf: [T, G] from `round_predictions` for this row (G >= gamma).
        seq: [T] prompt + the primary's greedy continuation.
        start: prompt length (the prefill emits seq[start]).
        end: prompt + tokens the request generates.
        gamma: γ_max.
        tau: τ (0 drafts γ_max every round).
        tau_first: the confidence a round's first draft needs (`SpecConfig.first_tau`; 0: every round drafts).

    Returns:
        Rounds, drafted tokens (exact up to the first rejected draft of each round), accepted drafts and declined
        rounds.
    """
    stats = SpeedStats()
    m = start  # the pending token's position; the prefill emitted seq[start]
    emitted = 1
    max_tokens = end - start
    while emitted < max_tokens:
        budget = max(1, min(gamma, max_tokens - emitted - 1))
        if tau_first > 0 and conf[m, 0] < tau_first:  # declined: a one-token primary step emits seq[m + 1]
            stats.declined += 1
            emitted += 1
            m += 1
            continue
        k = 0
        while True:  # draft d_{k+1} from position m + k, then the τ test on the same logits
            k += 1
            if k >= budget or (tau > 0 and conf[m, k - 1] < tau):
                break
        a = 0
        while a < k and m + a + 1 < seq.shape[0] and preds[m, a] == seq[m + a + 1]:
            a += 1
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        stats.blocks[k + 1] += 1
        emitted += a + 1
        m += a + 1
    return stats


def replay(
    preds: np.ndarray,
    conf: np.ndarray,
    seqs: np.ndarray,
    starts: Sequence[int],
    ends: Sequence[int],
    gamma: int,
    tau: float,
    tau_first: float = 0.0,
) -> SpeedStats:
    """`simulate_greedy_speed` over every row of [B, ...] predictions, summed; rows of fewer than 2 tokens are left out.

    Args:
        preds, conf: [B, T, G] from `round_predictions`.
        seqs: [B, T] prompt + the primary's greedy continuation per row.
        starts, ends: per row, the prompt's length and the continuation's end.
        gamma, tau, tau_first: as `simulate_greedy_speed` takes them.
    """
    total = SpeedStats()
    for b in range(seqs.shape[0]):
        if ends[b] - starts[b] >= 2:
            total.add(simulate_greedy_speed(preds[b], conf[b], seqs[b], starts[b], ends[b], gamma, tau, tau_first))
    return total


def acceptance_lengths(
    pcfg: LlamaConfig,
    pparams: LlamaParams,
    drafters: dict[str, Drafter],
    prompts: np.ndarray,
    cfg: EvalConfig,
    eos: Sequence[int] = (),
) -> dict[str, dict[str, Any]]:
    """Greedy SPEED mean acceptance length per drafter at each fixed γ and adaptive (τ, γ_max)."""
    seqs, lengths = greedy_continuations(pcfg, pparams, prompts, cfg.max_new, eos)
    block = max(*cfg.gammas, cfg.gamma_max)
    p = prompts.shape[1]
    out: dict[str, dict[str, Any]] = {}
    for name, d in drafters.items():
        preds, conf = round_predictions(pcfg, pparams, d, seqs, block, cfg.batch)
        settings = {f"gamma_{g}": (g, 0.0) for g in cfg.gammas} | {"adaptive": (cfg.gamma_max, cfg.tau)}
        res: dict[str, Any] = {}
        for key, (g, tau) in settings.items():
            total = replay(preds, conf, seqs, [p] * seqs.shape[0], [int(n) for n in lengths], g, tau)
            res[key] = total.mean_acceptance_length
            res[f"{key}_rounds"] = total.rounds
        out[name] = res
    return out


def evaluate(
    pcfg: LlamaConfig,
    pparams: LlamaParams,
    drafters: dict[str, Drafter],
    tokens: np.ndarray,
    cfg: EvalConfig = EvalConfig(),
    eos: Sequence[int] = (),
) -> dict[str, Any]:
    """Both families of figures on a flat array of held-out tokens; the JSON `tandem eval` writes."""
    windows = evenly_spaced_windows(tokens, cfg.seq_len + 1, cfg.windows)
    prompts = evenly_spaced_windows(tokens, cfg.prompt_len, cfg.prompts)
    return {
        "config": dataclasses.asdict(cfg),
        "models": table_metrics(pcfg, pparams, drafters, windows, cfg),
        "acceptance": acceptance_lengths(pcfg, pparams, drafters, prompts, cfg, eos),
    }


def evaluate_drafter_dirs(
    tokens: np.ndarray,
    drafters_dir: Path,
    names: Sequence[str] = ("vanilla", "tandem-ce", "tandem"),
    cfg: EvalConfig = EvalConfig(),
    gguf_path: Path | None = None,
) -> dict[str, Any]:
    """`tandem eval`: loads the primary and drafters_dir/<name> for each name, then `evaluate`."""
    from tandem.decoding.bundle import BundleConfig, load_primary_params
    from tandem.model.router import load_router

    pcfg, pparams, tokenizer = load_primary_params(BundleConfig(gguf_path=gguf_path))
    drafters = {}
    for name in names:
        directory = drafters_dir / name
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"no drafter {name!r} in {drafters_dir} (train one with `tandem train`)")
        dcfg, params = drafter_model.load_drafter(directory, primary_embed=pparams.embed)
        rcfg, rparams = load_router(directory) or (None, None)
        drafters[name] = Drafter(dcfg, params, router_params=rparams, router_cfg=rcfg)
    return evaluate(pcfg, pparams, drafters, tokens, cfg, eos=tuple(tokenizer.stop_token_ids))
