"""Training the drafters against the frozen primary: Tandem-CE, Tandem-Distil and the vanilla baseline.

All three drafters train in one loop on the same batches, so they see the same tokens (the same budget) and the
primary's forward pass (its tapped states for Tandem attention, its distribution for distillation) is paid once per
batch. The paper's recipe (docs/design.md, Method):
    tandem-ce   cross-entropy against the ground-truth next token for every step.
    tandem      Tandem-Distil: stage 1 as tandem-ce; stage 2 (from `distil_from` of the steps on)
                (1 - w) * CE(ground truth) + w * CE(primary's soft targets), w = 0.5.
    vanilla     the same small model without Tandem attention, with the same two stages (the distilled baseline).
The round mask uses block length γ = 2 (`block_len`), the paper's training γ; any γ works at inference.

Checkpoints are resumable and pickle-free: parameters and optimizer states as safetensors, the step and config as
JSON. A run stops after `max_minutes` at a checkpoint and continues where it stopped when started again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from tandem.config import DrafterConfig, LlamaConfig
from tandem.model import drafter as drafter_model
from tandem.model.drafter import DrafterParams
from tandem.model.primary import LlamaParams, forward_sequence
from tandem.model.router import RouterConfig, features, save_router, total_variation, train_router
from tandem.training.evaluate import Drafter

# name -> (reads the primary's states, distilled in stage 2)
DRAFTER_RECIPES: dict[str, tuple[bool, bool]] = {
    "tandem": (True, True),
    "tandem-ce": (True, False),
    "vanilla": (False, True),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run of the three drafters."""

    steps: int = 2000  # optimizer steps in total (both stages)
    batch_size: int = 32  # sequences per step
    seq_len: int = 512  # tokens per sequence (windows drawn at random offsets of the training split)
    block_len: int = 2  # γ of the training round mask (docs/design.md, Method: γ = 2)
    distil_from: float = 0.5  # fraction of steps after which stage 2 (distillation) starts
    distil_weight: float = 0.5  # w in (1 - w) * CE + w * soft CE during stage 2
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% of the peak
    weight_decay: float = 0.01
    clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # parameter initialisation and batch sampling
    checkpoint_every: int = 250  # steps between checkpoints
    drafters: tuple[str, ...] = tuple(DRAFTER_RECIPES)  # which of DRAFTER_RECIPES to train

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drafters"] = list(self.drafters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: (tuple(v) if k == "drafters" else v) for k, v in d.items() if k in names}
        return cls(**kwargs)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def batch_at(data: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
    """The batch of `step`: [batch_size, seq_len + 1] windows at offsets drawn from (seed, step), so a resumed run
    sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, data.shape[0] - cfg.seq_len - 1, size=cfg.batch_size)
    return np.stack([np.asarray(data[s : s + cfg.seq_len + 1], dtype=np.int32) for s in starts])


def _schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.1)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(_schedule(cfg), weight_decay=cfg.weight_decay))


def drafter_losses(
    params: DrafterParams,
    dcfg: DrafterConfig,
    primary_embed: jax.Array,
    tokens: jax.Array,
    hidden: jax.Array,
    primary_logp: jax.Array,
    distil_weight: jax.Array,
    block_len: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one drafter on one batch.

    Args:
        params: trainable drafter weights (a shared-embedding drafter's `embed` is derived here).
        dcfg: drafter config.
        primary_embed: [V, P] the primary's frozen embedding.
        tokens: [B, T + 1] token windows; positions 0..T-1 are inputs, 1..T targets.
        hidden: [B, T, n_taps, P] the primary's tapped states of the inputs.
        primary_logp: [B, T, V] the primary's log-probabilities of the next token.
        distil_weight: scalar w; loss = (1 - w) * CE(ground truth) + w * CE(primary).
        block_len: γ of the round mask.

    Returns:
        (loss, metrics) with metrics ce, soft_ce, agreement (top-1 agreement with the primary) and accuracy.
    """
    runnable = drafter_model.materialize(params, dcfg, primary_embed)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = drafter_model.train_forward(runnable, dcfg, inputs, hidden if dcfg.tandem else None, block_len)
    logq = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    ce = -jnp.mean(jnp.take_along_axis(logq, targets[..., None], axis=-1))
    soft_ce = -jnp.mean(jnp.sum(jnp.exp(primary_logp) * logq, axis=-1))
    loss = (1.0 - distil_weight) * ce + distil_weight * soft_ce
    guess = jnp.argmax(logits, axis=-1)
    metrics = {
        "ce": ce,
        "soft_ce": soft_ce,
        "agreement": jnp.mean(guess == jnp.argmax(primary_logp, axis=-1)),
        "accuracy": jnp.mean(guess == targets),
    }
    return loss, metrics


@functools.lru_cache(maxsize=4)
def _compiled_train_step(
    pcfg: LlamaConfig, drafters: tuple[tuple[str, DrafterConfig], ...], taps: tuple[int, ...], cfg: TrainConfig
) -> tuple[Callable[..., Any], optax.GradientTransformation]:
    """One jitted step of every drafter (and its optimizer), shared by every Trainer with the same static setup."""
    optimizer = make_optimizer(cfg)
    dcfgs = dict(drafters)

    def train_step(
        params: dict[str, DrafterParams],
        opt_states: dict[str, optax.OptState],
        pparams: LlamaParams,
        tokens: jax.Array,
        weights: dict[str, jax.Array],
    ) -> tuple[dict[str, DrafterParams], dict[str, optax.OptState], dict[str, dict[str, jax.Array]]]:
        # The primary's weights are an argument, not closure constants (XLA would constant-fold them).
        p_logits, hidden = forward_sequence(pparams, tokens[:, :-1], cfg=pcfg, taps=taps)
        p_logp = jax.lax.stop_gradient(jax.nn.log_softmax(p_logits, axis=-1))
        hidden = jax.lax.stop_gradient(hidden)
        new_params, new_opt, metrics = {}, {}, {}
        for name, p in params.items():
            grad_fn = jax.value_and_grad(drafter_losses, has_aux=True)
            (loss, m), grads = grad_fn(
                p, dcfgs[name], pparams.embed, tokens, hidden, p_logp, weights[name], cfg.block_len
            )
            updates, new_opt[name] = optimizer.update(grads, opt_states[name], p)
            new_params[name] = optax.apply_updates(p, updates)
            metrics[name] = {"loss": loss, **m}
        return new_params, new_opt, metrics

    return jax.jit(train_step, donate_argnums=(0, 1)), optimizer


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs: the step, and per drafter its trainable params and optimizer state."""

    step: int
    params: dict[str, DrafterParams]
    opt_states: dict[str, optax.OptState]


class Trainer:
    """Trains the drafters of `cfg.drafters` against a frozen primary; see the module docstring."""

    def __init__(
        self,
        pcfg: LlamaConfig,
        pparams: LlamaParams,
        dcfgs: dict[str, DrafterConfig],
        cfg: TrainConfig,
    ) -> None:
        unknown = set(cfg.drafters) - set(DRAFTER_RECIPES)
        if unknown:
            raise ValueError(f"unknown drafters {sorted(unknown)}; choose from {list(DRAFTER_RECIPES)}")
        taps = {dcfgs[n].tapped_layers for n in cfg.drafters if dcfgs[n].tandem}
        if len(taps) > 1:
            raise ValueError(f"Tandem drafters must read the same primary layers, got {taps}")
        self.pcfg, self.pparams, self.dcfgs, self.cfg = pcfg, pparams, dcfgs, cfg
        self.taps: tuple[int, ...] = taps.pop() if taps else ()
        drafters = tuple((n, dcfgs[n]) for n in cfg.drafters)
        self._step_fn, self.optimizer = _compiled_train_step(pcfg, drafters, self.taps, cfg)

    def init_state(self, init_from: Path | None = None) -> TrainState:
        """Step 0: random drafters, or (fine-tuning) the drafters stored under init_from/<name> by an export."""
        names = self.cfg.drafters
        if init_from is None:
            params = {n: drafter_model.init_params(self.dcfgs[n], self.cfg.seed + i) for i, n in enumerate(names)}
        else:
            params = {n: trainable_params(init_from / n, self.dcfgs[n], self.pparams.embed) for n in names}
        return TrainState(0, params, {n: self.optimizer.init(p) for n, p in params.items()})

    def distil_weights(self, step: int) -> dict[str, float]:
        """Each drafter's w at `step` (0 during stage 1 and for tandem-ce)."""
        stage2 = step >= int(self.cfg.distil_from * self.cfg.steps)
        return {n: self.cfg.distil_weight if (stage2 and DRAFTER_RECIPES[n][1]) else 0.0 for n in self.cfg.drafters}

    def step(self, state: TrainState, tokens: np.ndarray) -> dict[str, dict[str, float]]:
        """One optimizer step of every drafter on [B, T + 1] tokens; updates `state` in place."""
        weights = {n: jnp.float32(w) for n, w in self.distil_weights(state.step).items()}
        state.params, state.opt_states, metrics = self._step_fn(
            state.params, state.opt_states, self.pparams, jnp.asarray(tokens), weights
        )
        state.step += 1
        return {n: {k: float(v) for k, v in m.items()} for n, m in metrics.items()}

    def run(
        self,
        data: np.ndarray,
        out_dir: Path,
        *,
        max_minutes: float | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
        init_from: Path | None = None,
    ) -> TrainState:
        """Trains until `cfg.steps` or `max_minutes`, checkpointing into out_dir; resumes from out_dir if it holds one.

        Args:
            data: the training split as a flat token array.
            out_dir: checkpoint directory (created).
            max_minutes: stop (after a checkpoint) once this much wall time has passed; None = run to the end.
            progress: show a progress bar with losses and tokens/s.
            on_step: called with (step, metrics) after every step.
            init_from: start from the exported drafters in this directory (fine-tuning) instead of random ones.

        Returns:
            The state reached (also saved in out_dir).
        """
        resume = (out_dir / "trainer.json").exists()
        state = load_checkpoint(out_dir, self) if resume else self.init_state(init_from)
        start_time = time.monotonic()
        bar = _progress(state.step, self.cfg.steps, enabled=progress)
        tokens_done, t_last = 0, time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "log.jsonl"
        if log_path.exists():  # drop lines of steps after the checkpoint (an interrupted run logged them)
            kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] < state.step]
            log_path.write_text("".join(ln + "\n" for ln in kept))
        log = log_path.open("a")
        try:
            for step in range(state.step, self.cfg.steps):
                metrics = self.step(state, batch_at(data, step, self.cfg))
                tokens_done += self.cfg.tokens_per_step
                if on_step is not None:
                    on_step(step, metrics)
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                now = time.monotonic()
                rate = tokens_done / max(now - t_last, 1e-9)
                bar.update(1)
                bar.set_postfix_str(
                    " ".join(f"{n}:{m['loss']:.3f}/{100 * m['agreement']:.1f}%" for n, m in metrics.items())
                    + f" {rate:,.0f} tok/s"
                )
                done = state.step >= self.cfg.steps
                out_of_time = max_minutes is not None and (now - start_time) / 60 >= max_minutes
                if done or out_of_time or state.step % self.cfg.checkpoint_every == 0:
                    save_checkpoint(out_dir, self, state)
                if out_of_time:
                    break
        finally:
            bar.close()
            log.close()
        return state


def trainable_params(directory: Path, dcfg: DrafterConfig, primary_embed: jax.Array) -> DrafterParams:
    """An exported drafter as the trainable parameters of `dcfg` (shared embedding, full-vocabulary head)."""
    stored, params = drafter_model.load_drafter(directory, primary_embed=primary_embed)
    if dataclasses.replace(stored, head_vocab=0) != dcfg:
        raise ValueError(f"{directory} holds a drafter of another shape: {stored} (training {dcfg})")
    return dataclasses.replace(params, embed=None if dcfg.shared_embed else params.embed, head=None, head_ids=None)


def _progress(initial: int, total: int, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(initial=initial, total=total, unit="step", disable=not enabled, dynamic_ncols=True)


# --- checkpoints: safetensors + JSON, no pickle ---


def flat_tree(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves(tree)
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}


def unflat_tree(template: Any, arrays: dict[str, np.ndarray]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(arrays) != len(leaves):
        raise ValueError(f"checkpoint has {len(arrays)} arrays, expected {len(leaves)}: a different model or optimizer")
    restored = []
    for i, like in enumerate(leaves):
        a = arrays[f"{i:05d}"]
        if a.shape != np.shape(like):
            raise ValueError(f"checkpoint array {i} has shape {a.shape}, expected {np.shape(like)}")
        restored.append(jnp.asarray(a, dtype=jnp.asarray(like).dtype))
    return jax.tree_util.tree_unflatten(treedef, restored)


def save_checkpoint(out_dir: Path, trainer: Trainer, state: TrainState) -> None:
    """Writes every drafter's params and optimizer state into a new `step-N/` directory, then points trainer.json at
    it (atomic rename) and removes older step directories, so an interrupted write never leaves a torn checkpoint."""
    step_dir = out_dir / f"step-{state.step:06d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    for name in trainer.cfg.drafters:
        save_file(flat_tree(state.params[name]), str(step_dir / f"{name}.params.safetensors"))
        save_file(flat_tree(state.opt_states[name]), str(step_dir / f"{name}.opt.safetensors"))
    meta = {
        "step": state.step,
        "dir": step_dir.name,
        "train": trainer.cfg.to_dict(),
        "drafters": {n: trainer.dcfgs[n].to_dict() for n in trainer.cfg.drafters},
    }
    tmp = out_dir / "trainer.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / "trainer.json")
    for old in out_dir.glob("step-*"):
        if old != step_dir:
            shutil.rmtree(old)


def load_checkpoint(out_dir: Path, trainer: Trainer) -> TrainState:
    """Restores a state written by `save_checkpoint` for the same drafter configs and training settings.

    Raises:
        ValueError: the checkpoint belongs to other drafter shapes or other settings (a resumed run must continue the
            same schedule; use a new output directory for a new run).
    """
    meta = json.loads((out_dir / "trainer.json").read_text())
    for name in trainer.cfg.drafters:
        saved = DrafterConfig.from_dict(meta["drafters"][name]) if name in meta["drafters"] else None
        if saved != trainer.dcfgs[name]:
            raise ValueError(f"{out_dir}: checkpoint's {name} drafter config differs from this run's")
    ours = {k: v for k, v in trainer.cfg.to_dict().items() if k != "checkpoint_every"}
    theirs = {k: v for k, v in meta["train"].items() if k != "checkpoint_every"}
    if ours != theirs:
        changed = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise ValueError(f"{out_dir}: checkpoint was trained with other settings ({', '.join(changed)}); "
                         "rerun with the same flags or use a new --out")  # fmt: skip
    step_dir = out_dir / meta["dir"]
    template = trainer.init_state()
    params = {
        n: unflat_tree(template.params[n], load_file(str(step_dir / f"{n}.params.safetensors")))
        for n in trainer.cfg.drafters
    }
    opt = {
        n: unflat_tree(template.opt_states[n], load_file(str(step_dir / f"{n}.opt.safetensors")))
        for n in trainer.cfg.drafters
    }
    return TrainState(int(meta["step"]), params, opt)


def token_frequencies(data: np.ndarray, vocab_size: int) -> np.ndarray:
    """[V] counts of each token id in a flat token array."""
    return np.bincount(np.asarray(data, dtype=np.int64), minlength=vocab_size)[:vocab_size]


def head_ids_by_frequency(counts: np.ndarray, n: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """The n most frequent token ids (ties by lower id), always including `always` (e.g. EOS), sorted ascending."""
    order = np.argsort(-counts, kind="stable")
    chosen = list(dict.fromkeys([*always, *order[: n + len(always)].tolist()]))[:n]
    return np.sort(np.asarray(chosen, dtype=np.int32))


# --- export: the shipped drafters (fp16, restricted head) and their routers ---


def router_dataset(
    pcfg: LlamaConfig, pparams: LlamaParams, d: Drafter, windows: np.ndarray, rcfg: RouterConfig, block: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Router features and soft labels 1 - TV(q, p) at every position of [N, T] windows.

    Rounds of `block` positions start at a different offset in each window, so every draft depth is represented.
    """

    @jax.jit  # weights are arguments, not closure constants (XLA would constant-fold them)
    def one(pparams: LlamaParams, d: Drafter, tokens: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
        p_logits, hidden = forward_sequence(pparams, tokens, cfg=pcfg, taps=d.cfg.tapped_layers)
        logits = drafter_model.train_forward(d.params, d.cfg, tokens, hidden if d.cfg.tandem else None, block, offset)
        tv = total_variation(jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(p_logits, -1))
        assert d.params.embed is not None
        return features(logits, d.params.embed, rcfg.top_k), 1.0 - tv

    feats, labels = [], []
    for i in range(windows.shape[0]):
        f, y = one(pparams, d, jnp.asarray(windows[i : i + 1]), jnp.int32(i % block))
        feats.append(np.asarray(f).reshape(-1, rcfg.n_features))
        labels.append(np.asarray(y).reshape(-1))
    return np.concatenate(feats), np.concatenate(labels)


def export_drafters(
    state: TrainState,
    dcfgs: dict[str, DrafterConfig],
    pcfg: LlamaConfig,
    pparams: LlamaParams,
    out_dir: Path,
    *,
    head_ids: np.ndarray | None,
    router_windows: np.ndarray,
    dtype: str = "float16",
    router_steps: int = 2000,
) -> dict[str, Any]:
    """Writes each trained drafter (with a restricted head when head_ids is given) and a router fitted to it.

    Every drafter is reloaded from what was written (fp16 storage included) before its router is fitted, so the
    router sees exactly the drafter that will be served.

    Returns:
        Per drafter: the router's fit figures and the written size in bytes.
    """
    report: dict[str, Any] = {}
    for name, params in state.params.items():
        cfg = dcfgs[name]
        if head_ids is not None:
            cfg = dataclasses.replace(cfg, head_vocab=int(head_ids.shape[0]))
            params = dataclasses.replace(params, head_ids=jnp.asarray(head_ids, jnp.int32))
        target = out_dir / name
        drafter_model.save_drafter(target, cfg, params, dtype=dtype)
        cfg, runnable = drafter_model.load_drafter(target, primary_embed=pparams.embed)
        rcfg = RouterConfig(d_embed=cfg.d_model)
        feats, labels = router_dataset(pcfg, pparams, Drafter(cfg, runnable), router_windows, rcfg)
        rparams, fit = train_router(feats, labels, rcfg, steps=router_steps)
        save_router(target, rcfg, rparams)
        size = sum(f.stat().st_size for f in target.iterdir())
        report[name] = {"router": fit, "bytes": size, "router_examples": int(labels.shape[0])}
    return report


def train_drafters(
    corpus_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    export_dir: Path,
    d_model: int = 256,
    n_layers: int = 4,
    head_vocab: int = 16384,
    max_minutes: float | None = None,
    gguf_path: Path | None = None,
    progress: bool = True,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """`tandem train`: trains (or resumes) the drafters on a corpus built by `tandem corpus`, then exports them.

    Args:
        corpus_dir: holds train.bin (see tandem.training.corpus).
        out_dir: checkpoints and the training log.
        cfg: the run.
        export_dir: where the finished drafters and routers are written (e.g. tandem/weights to ship them).
        d_model, n_layers: drafter shape (every drafter the same; shared embedding with the primary).
        head_vocab: restricted output head size (0 = full vocabulary), chosen by corpus frequency.
        max_minutes: stop at a checkpoint after this long; rerun to continue.
        gguf_path: the primary (default: the bundled SmolLM2).
        progress: show the progress bar.
        init_from: fine-tune the drafters exported in this directory (e.g. tandem/weights); their draft head is kept.

    Returns:
        {"step", "finished"} and, once finished, the export report.
    """
    from tandem.decoding.bundle import BundleConfig, default_drafter_config, load_primary_params
    from tandem.training.corpus import load_split

    pcfg, pparams, tokenizer = load_primary_params(BundleConfig(gguf_path=gguf_path))
    dcfgs = {
        n: dataclasses.replace(
            default_drafter_config(pcfg, DRAFTER_RECIPES[n][0], d_model, n_layers), shared_embed=True
        )
        for n in cfg.drafters
    }
    data = load_split(corpus_dir, "train")
    trainer = Trainer(pcfg, pparams, dcfgs, cfg)
    state = trainer.run(data, out_dir, max_minutes=max_minutes, progress=progress, init_from=init_from)
    result: dict[str, Any] = {"step": state.step, "finished": state.step >= cfg.steps}
    if not result["finished"]:
        return result
    head_ids = None
    if init_from is not None and head_vocab:  # keep the head the drafters were trained with
        head_ids = np.asarray(load_file(str(init_from / cfg.drafters[0] / "model.safetensors"))["head_ids"])
    elif head_vocab:
        counts = token_frequencies(data, pcfg.vocab_size)
        head_ids = head_ids_by_frequency(counts, head_vocab, always=tuple(tokenizer.stop_token_ids))
        result["head_coverage"] = float(counts[head_ids].sum() / counts.sum())
    router_windows = batch_at(data, cfg.steps, dataclasses.replace(cfg, batch_size=32))  # a batch training never drew
    result["export"] = export_drafters(
        state, dcfgs, pcfg, pparams, export_dir, head_ids=head_ids, router_windows=router_windows
    )
    (export_dir / "training.json").write_text(
        json.dumps({"train": cfg.to_dict(), **result}, indent=2, sort_keys=True) + "\n"
    )
    return result
