"""Training a drafter on the primary's recorded states: the feature-level recipe, with no primary pass per step.

`tandem distill-data --record-taps ...` stores the primary's chat answers with its tapped states, token for token.
Here a drafter learns from them alone:

    tandem      the feature-level Tandem drafter (`DrafterConfig.reads == "features"`): its input at position i is
                the primary's state at i - 1 fused with the embedding of token i. Trained at every depth of a
                drafting round at once (`tandem.model.drafter.feature_round_steps`): depth s reads its own outputs
                where a round s positions deep would, so later drafts are trained as they are served. Depth s's
                loss weighs decay**s.
    vanilla     the same shape without the primary's states (the `speed` baseline): the same data and budget.

`init_from` fine-tunes a stored drafter instead, keeping its shape and draft vocabulary: a vanilla one, a
feature-level one, or the paper's layer-map Tandem drafter (`DrafterConfig.reads == "layers"`), whose layers attend to
the recorded states of the positions before its round; its depth s at position i is then the round that began at
i - s, one pass per round phase (`train_outputs` with offsets 0 .. depth - 1).

Targets: the primary's distribution at each position (from its recorded top-layer state through its own final norm
and head, over the draft vocabulary) mixed with the token it wrote: (1 - w) * soft CE + w * CE. The draft
vocabulary is the training answers' most frequent tokens. The primary's embedding, final norm and last layers give
the drafter its start (`init_params`): its layers begin as copies of the primary's last ones.

Runs resume from their checkpoint (params, optimizer and step; batches are drawn from (seed, step)); a finished run
exports float16 weights that `tandem.decoding.bundle` loads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from tandem.config import DrafterConfig, LlamaConfig
from tandem.decoding.lookup import LookupConfig, lookup_drafts
from tandem.model import drafter as drafter_model
from tandem.model.drafter import DrafterParams
from tandem.model.layers import output_logits, rms_norm
from tandem.model.primary import LlamaParams, float_only
from tandem.training.corpus import TOKEN_DTYPE
from tandem.training.states import STATE_DTYPE, STATES_SUFFIX, answer_mask, example_bounds
from tandem.training.train import flat_tree, unflat_tree

KINDS = ("tandem", "vanilla")


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    """One drafter's training run on recorded states."""

    kind: str = "tandem"  # "tandem" (feature-level) or "vanilla" (no primary inputs)
    steps: int = 3000  # optimizer steps
    batch_size: int = 8  # examples per step
    seq_len: int = 256  # positions per example (longer examples are cut)
    depth: int = 3  # round depths trained at once (1 for vanilla: its rounds are plain causal steps)
    depth_decay: float = 0.8  # depth s's loss weight: depth_decay ** s
    hard_weight: float = 0.5  # w in (1 - w) * CE(primary's distribution) + w * CE(its token)
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% of the peak
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient-norm clip
    n_layers: int = 1  # drafter layers, at the primary's width, initialised from its last layers
    feature_layers: tuple[int, ...] = ()  # primary layers fused into the first input (recorded ones); (): the top
    head_vocab: int = 8192  # draft vocabulary: the training answers' most frequent tokens
    val_fraction: float = 0.05  # examples held out for evaluation
    init_from: str = ""  # a stored drafter to fine-tune (its shape, head and kind); "": the shape above, fresh
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} must be one of {KINDS}")
        if self.depth < 1 or self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("depth, steps and batch_size must be >= 1 and seq_len >= 2")
        object.__setattr__(self, "feature_layers", tuple(int(x) for x in self.feature_layers))


@dataclasses.dataclass
class StatesCorpus:
    """A self-distilled split with its recorded states (`tandem.training.selfdistill`)."""

    tokens: np.ndarray  # [N] token ids
    states: np.ndarray  # [N, n_taps, P] float16, the primary's tapped states at each token
    taps: tuple[int, ...]  # the recorded primary layers
    examples: list[tuple[int, int]]  # (begin, end) of each chat example
    answers: np.ndarray  # [N] bool: the tokens the primary wrote


def open_corpus(directory: Path, split: str = "train") -> StatesCorpus:
    """Reads `<split>.bin` and `<split>.states.f16` of a `tandem distill-data --record-taps` directory."""
    manifest = json.loads((directory / "manifest.json").read_text())
    states_info = manifest.get("states")
    if not states_info:
        raise ValueError(
            f"{directory} has no recorded states (tandem distill-data --record-taps or tandem record-states write them)"
        )
    taps = tuple(int(t) for t in states_info["taps"])
    tokens = np.fromfile(directory / f"{split}.bin", dtype=TOKEN_DTYPE)
    path = directory / f"{split}.{STATES_SUFFIX}"
    width = int(states_info["width"])
    states = np.memmap(path, dtype=STATE_DTYPE, mode="r", shape=(tokens.size, len(taps), width))
    return StatesCorpus(tokens, states, taps, example_bounds(tokens), answer_mask(tokens))


def drafter_shape(primary: LlamaConfig, cfg: OfflineConfig) -> DrafterConfig:
    """The drafter trained here: the primary's layer shape, `n_layers` deep, its embedding shared."""
    return DrafterConfig(
        vocab_size=primary.vocab_size,
        d_model=primary.d_model,
        n_layers=cfg.n_layers,
        n_heads=primary.n_heads,
        n_kv_heads=primary.n_kv_heads,
        head_dim=primary.head_dim,
        ffn_dim=primary.ffn_dim,
        rope_theta=primary.rope_theta,
        rms_eps=primary.rms_eps,
        tandem=cfg.kind == "tandem",
        primary_d_model=primary.d_model,
        primary_n_layers=primary.n_layers,
        shared_embed=True,
        head_vocab=cfg.head_vocab,
        reads="features",
        feature_layers=cfg.feature_layers or (primary.n_layers,),
    )


def init_params(dcfg: DrafterConfig, primary: LlamaParams, head_ids: np.ndarray, seed: int) -> DrafterParams:
    """Trainable start: the primary's last layers and final norm, its embedding as is (`embed_proj` = I), its top
    state passed through (`fuse_feat` = I on the top layer's columns, 0 on the others') and the token's embedding
    added by a small random product (std 0.02, so the primary's states dominate the first input)."""
    params = drafter_model.init_params(dcfg, seed)
    layers = float_only(primary).layers[len(primary.layers) - dcfg.n_layers :]
    eye = jnp.eye(dcfg.d_model, dtype=jnp.float32)
    if dcfg.features:
        top = dcfg.feature_layers.index(max(dcfg.feature_layers))  # inputs are fused in feature_layers order
        fuse = jnp.zeros((dcfg.d_model, len(dcfg.tapped_layers), dcfg.d_model), jnp.float32).at[:, top].set(eye)
    emb = None
    if params.fuse_emb is not None:  # drawn on its own, so the start is the same whichever layers are fused
        emb = jnp.asarray(np.random.default_rng(seed).normal(0.0, 0.02, (dcfg.d_model, dcfg.d_model)), jnp.float32)
    return dataclasses.replace(
        params,
        layers=tuple(layers),
        final_norm=jnp.asarray(primary.final_norm),
        embed_proj=eye,
        fuse_feat=fuse.reshape(dcfg.d_model, -1) if dcfg.features else None,
        fuse_emb=emb,
        head_ids=jnp.asarray(head_ids, jnp.int32),
    )


def head_ids_for(corpus: StatesCorpus, n: int, examples: Sequence[tuple[int, int]]) -> np.ndarray:
    """The n most frequent answer tokens of `examples` (ties by id), as the draft vocabulary."""
    idx = np.concatenate([np.arange(b, e) for b, e in examples])
    counts = np.bincount(corpus.tokens[idx[corpus.answers[idx]]], minlength=int(corpus.tokens.max()) + 1)
    return np.argsort(-counts, kind="stable")[:n].astype(np.int32)


def example_batch(corpus: StatesCorpus, examples: Sequence[tuple[int, int]], seq_len: int) -> dict[str, np.ndarray]:
    """Examples as [B, T] rows: tokens, the states at each token, next tokens and where they count (answers)."""
    b_n = len(examples)
    tokens = np.zeros((b_n, seq_len), np.int32)
    targets = np.zeros((b_n, seq_len), np.int32)
    mask = np.zeros((b_n, seq_len), np.float32)
    states = np.zeros((b_n, seq_len, *corpus.states.shape[1:]), np.float32)
    for r, (b, e) in enumerate(examples):
        n = min(e - b, seq_len)
        tokens[r, :n] = corpus.tokens[b : b + n]
        states[r, :n] = corpus.states[b : b + n]
        m = min(e - b - 1, seq_len)  # positions with a next token inside the example
        targets[r, :m] = corpus.tokens[b + 1 : b + 1 + m]
        mask[r, :m] = corpus.answers[b + 1 : b + 1 + m]
    return {"tokens": tokens, "states": states, "targets": targets, "mask": mask}


def _split(corpus: StatesCorpus, cfg: OfflineConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    order = np.random.default_rng(cfg.seed).permutation(len(corpus.examples))
    n_val = max(1, int(len(order) * cfg.val_fraction))
    val = sorted(corpus.examples[i] for i in order[:n_val])
    return [corpus.examples[i] for i in sorted(order[n_val:])], val


class OfflineTrainer:
    """One drafter's training on a `StatesCorpus` against the primary's recorded distribution."""

    def __init__(self, cfg: OfflineConfig, corpus: StatesCorpus, primary_cfg: LlamaConfig, primary: LlamaParams):
        if primary_cfg.n_layers not in corpus.taps:
            raise ValueError(
                f"the corpus records layers {corpus.taps}, not the primary's top layer {primary_cfg.n_layers}"
            )
        self.cfg, self.corpus, self.primary = cfg, corpus, primary
        self.train_examples, self.val_examples = _split(corpus, cfg)
        self.embed = jnp.asarray(float_only(primary).embed)  # [V, P]
        self.start: DrafterParams | None = None
        if cfg.init_from:
            self.dcfg, start = drafter_model.load_drafter(Path(cfg.init_from), primary_embed=self.embed)
            if self.dcfg.tandem != (cfg.kind == "tandem"):
                raise ValueError(f"{cfg.init_from} holds a drafter of another kind than {cfg.kind!r}")
            if not self.dcfg.shared_embed or start.head_ids is None:
                raise ValueError(f"{cfg.init_from}: only drafters sharing the primary's embedding with a draft head")
            self.head_ids = np.asarray(start.head_ids)
            self.start = dataclasses.replace(start, embed=None, head=None, head_ids=None)
        else:
            self.head_ids = head_ids_for(corpus, cfg.head_vocab, self.train_examples)
            self.dcfg = drafter_shape(primary_cfg, dataclasses.replace(cfg, head_vocab=int(self.head_ids.size)))
        missing = sorted(set(self.dcfg.tapped_layers) - set(corpus.taps))
        if missing:
            raise ValueError(f"the drafter reads primary layers {missing}, not recorded in the corpus ({corpus.taps})")
        self.top = corpus.taps.index(primary_cfg.n_layers)  # the recorded top layer: the teacher's state
        self.primary_eps = primary_cfg.rms_eps
        self.feature_taps = [corpus.taps.index(t) for t in self.dcfg.tapped_layers]
        vocab = primary_cfg.vocab_size
        self.head_index = (
            jnp.full((vocab,), -1, jnp.int32)
            .at[jnp.asarray(self.head_ids)]
            .set(jnp.arange(self.head_ids.size, dtype=jnp.int32))
        )  # token id -> its row in the draft head (-1: outside)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, min(cfg.warmup, cfg.steps), max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.1
        )
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(cfg.clip), optax.adamw(schedule, weight_decay=cfg.weight_decay)
        )
        self._step = jax.jit(self._train_step)
        self._eval = jax.jit(self._outcomes)

    # --- the model's outputs and the loss ---

    def _depth_outputs(self, params: DrafterParams, batch: dict[str, jax.Array]) -> list[jax.Array]:
        """Per trained depth, the drafter's last-layer outputs [D, N]."""
        runnable = drafter_model.materialize(params, self.dcfg, self.embed)
        tokens = batch["tokens"]
        if not self.dcfg.tandem:
            return [drafter_model.train_outputs(runnable, self.dcfg, tokens, None, 1)]
        states = batch["states"][:, :, jnp.asarray(self.feature_taps)]
        if self.dcfg.features:
            feats = drafter_model.shift_features(states)
            return drafter_model.feature_round_steps(runnable, self.dcfg, tokens, feats, self.cfg.depth)
        b, t = tokens.shape
        depth = self.cfg.depth
        by_phase = jnp.stack(  # [depth, D, N]: rounds starting at positions o, o + depth, ...
            [drafter_model.train_outputs(runnable, self.dcfg, tokens, states, depth, o) for o in range(depth)]
        )
        i = jnp.arange(t)
        return [by_phase[jnp.tile((i - s) % depth, b), :, jnp.arange(b * t)].T for s in range(depth)]

    def _head(self, params: DrafterParams) -> jax.Array:
        """[N_h, D] the draft head: the shared embedding's rows of the draft vocabulary."""
        assert params.embed_proj is not None, "drafters trained here share the primary's embedding"
        return self.embed[jnp.asarray(self.head_ids)] @ params.embed_proj

    def _teacher(self, batch: dict[str, jax.Array]) -> jax.Array:
        """[N_h, N] the primary's log-probabilities over the draft vocabulary, from its recorded top-layer state."""
        top = batch["states"][:, :, self.top].reshape(-1, self.embed.shape[1]).T  # [P, N]
        normed = rms_norm(top, jnp.asarray(self.primary.final_norm), self.primary_eps)
        return jax.nn.log_softmax(self.embed[jnp.asarray(self.head_ids)] @ normed, axis=0)

    def _loss(self, params: DrafterParams, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        outs = self._depth_outputs(params, batch)
        teacher = jnp.exp(self._teacher(batch))  # [N_h, N]
        head = self._head(params)
        target = self.head_index[batch["targets"].reshape(-1)]  # [N]
        mask = batch["mask"].reshape(-1)
        t = batch["tokens"].shape[1]
        total, metrics = jnp.float32(0.0), {}
        for s, x in enumerate(outs):
            logq = jax.nn.log_softmax(output_logits(x, params.final_norm, head, self.dcfg.rms_eps), axis=0)
            valid = mask * (jnp.arange(mask.size) % t >= s)  # depth s needs a round start at i - s >= 0
            n = jnp.maximum(valid.sum(), 1.0)
            soft = -jnp.sum(jnp.sum(teacher * logq, axis=0) * valid) / n
            hard_valid = valid * (target >= 0)
            hard_lq = jnp.take_along_axis(logq, jnp.maximum(target, 0)[None], axis=0)[0]
            hard = -jnp.sum(hard_lq * hard_valid) / jnp.maximum(hard_valid.sum(), 1.0)
            total = total + self.cfg.depth_decay**s * ((1 - self.cfg.hard_weight) * soft + self.cfg.hard_weight * hard)
            metrics[f"ce{s}"] = hard
        return total, metrics

    def _train_step(self, params: DrafterParams, opt_state: Any, batch: dict[str, jax.Array]) -> tuple:
        (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    def _outcomes(self, params: DrafterParams, batch: dict[str, jax.Array]) -> jax.Array:
        """[depth, B, T] whether each depth's draft is the token the primary wrote."""
        outs = self._depth_outputs(params, batch)
        head = self._head(params)
        b, t = batch["tokens"].shape
        target = self.head_index[batch["targets"].reshape(-1)]
        return jnp.stack(
            [jnp.argmax(output_logits(x, params.final_norm, head, self.dcfg.rms_eps), axis=0) == target for x in outs]
        ).reshape(len(outs), b, t)

    # --- the loop ---

    def init(self) -> tuple[DrafterParams, Any]:
        if self.start is not None:
            return self.start, self.optimizer.init(self.start)
        params = init_params(self.dcfg, self.primary, self.head_ids, self.cfg.seed)
        params = dataclasses.replace(params, embed=None, head=None, head_ids=None)  # derived at every step
        return params, self.optimizer.init(params)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, step])
        pick = rng.integers(0, len(self.train_examples), size=self.cfg.batch_size)
        return example_batch(self.corpus, [self.train_examples[i] for i in pick], self.cfg.seq_len)

    def evaluate(self, params: DrafterParams, lookup: LookupConfig | None = None) -> dict[str, Any]:
        """Held-out answers: acceptance at each draft position (conditional on the earlier ones, teacher-forced) and
        a replay of greedy rounds (`replay`)."""
        accepted = np.zeros(self.cfg.depth if self.dcfg.tandem else 1)
        tried = np.zeros_like(accepted)
        replays: dict[str, np.ndarray] = {}
        causal = not self.dcfg.tandem  # a vanilla drafter's every depth is its depth 0
        for i in range(0, len(self.val_examples), self.cfg.batch_size):
            examples = self.val_examples[i : i + self.cfg.batch_size]
            batch = example_batch(self.corpus, examples, self.cfg.seq_len)
            ok = np.asarray(self._eval(params, batch))  # [S, B, T]
            mask = batch["mask"] > 0
            chain = np.ones_like(ok[0])
            for s in range(ok.shape[0]):
                before = np.ones_like(chain) if s == 0 else np.pad(chain, ((0, 0), (1, 0)))[:, :-1]
                accepted[s] += (ok[s] & before & mask).sum()
                tried[s] += (before & mask).sum()
                chain = ok[s] & before
            for r, (b, e) in enumerate(examples):
                for key, counts in replay(self.corpus, b, e, ok[:, r], self.cfg.seq_len, lookup, causal).items():
                    replays[key] = replays.get(key, np.zeros(4)) + counts
        out: dict[str, Any] = {"acceptance_per_position": (accepted / np.maximum(tried, 1)).round(4).tolist()}
        for key, (verifies, tokens, drafted, first_ok) in sorted(replays.items()):
            out[key] = {
                "tokens_per_verify": round(float(tokens / max(verifies, 1)), 4),
                "first_draft_acceptance": round(float(first_ok / max(drafted, 1)), 4),
            }
        return out

    def run(
        self, out_dir: Path, *, max_minutes: float | None = None, log: Any = print, eval_every: int = 0
    ) -> dict[str, Any]:
        """Trains (or resumes) into out_dir; returns the progress record (finished: all steps done)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        params, opt_state = self.init()
        step = 0
        meta_path = out_dir / "offline.json"
        settings = json.loads(json.dumps(dataclasses.asdict(self.cfg)))  # as JSON reads it back (lists)
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            defaults = json.loads(json.dumps(dataclasses.asdict(OfflineConfig())))  # fields added since it started
            if {k: v for k, v in {**defaults, **meta["config"]}.items() if k != "checkpoint_every"} != {
                k: v for k, v in settings.items() if k != "checkpoint_every"
            }:
                raise ValueError(f"{out_dir} was trained with other settings: {meta['config']}")
            params = unflat_tree(params, load_file(str(out_dir / "params.safetensors")))
            opt_state = unflat_tree(opt_state, load_file(str(out_dir / "opt.safetensors")))
            step = int(meta["step"])
        start = time.monotonic()

        def save() -> None:
            save_file(flat_tree(params), str(out_dir / "params.safetensors"))
            save_file(flat_tree(opt_state), str(out_dir / "opt.safetensors"))
            meta_path.write_text(json.dumps({"step": step, "config": settings}, indent=2) + "\n")

        while step < self.cfg.steps:
            params, opt_state, loss, metrics = self._step(params, opt_state, self.batch(step))
            step += 1
            if step % 20 == 0 or step == self.cfg.steps:
                shown = {k: round(float(v), 3) for k, v in metrics.items()}
                log(f"step {step}/{self.cfg.steps} loss {float(loss):.3f} {shown} ({time.monotonic() - start:.0f} s)")
            if eval_every and step % eval_every == 0:
                log(f"step {step}: {json.dumps(self.evaluate(params))}")
            if step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps:
                save()
            if max_minutes is not None and (time.monotonic() - start) / 60 >= max_minutes:
                save()
                break
        self.params = params
        return {"step": step, "finished": step >= self.cfg.steps}

    def export(self, directory: Path) -> None:
        """Writes the trained drafter (float16) where `tandem.decoding.bundle` loads drafters from."""
        params = dataclasses.replace(self.params, head_ids=jnp.asarray(self.head_ids), embed=None)
        drafter_model.save_drafter(directory, self.dcfg, params, dtype="float16")


def replay(
    corpus: StatesCorpus,
    begin: int,
    end: int,
    ok: np.ndarray,
    seq_len: int,
    lookup: LookupConfig | None = None,
    causal: bool = False,
    max_gamma: int = 4,
) -> dict[str, np.ndarray]:
    """Greedy rounds over one example's answer, as serving runs them: a round starting with the free token at
    position q drafts depth 0 at q, depth 1 at q + 1, ...; it keeps drafts up to the first wrong one and the next
    round starts after the primary's own token. With `lookup`, a round whose request has a matching n-gram drafts
    the copied tokens instead (`tandem.decoding.lookup`).

    Args:
        ok: [depth, T] whether depth s's draft at each position is the token the primary wrote.
        causal: a drafter whose every depth is depth 0 (vanilla: fed its accepted drafts, it sees what the primary
            wrote), replayed up to max_gamma; otherwise up to the depths trained.

    Returns:
        {"<policy>@gamma=<g>": [verifies, tokens, rounds that drafted, rounds whose first draft was kept]} for the
        drafter alone ("drafter") and, with `lookup`, lookup first then the drafter ("lookup+drafter").
    """
    tokens = corpus.tokens
    first_answer = begin + int(np.argmax(corpus.answers[begin:end])) if corpus.answers[begin:end].any() else end
    last = min(end, begin + seq_len) - 1  # the newest position whose next token the evaluation covers
    out: dict[str, np.ndarray] = {}
    policies = ["drafter", "lookup+drafter"] if lookup is not None else ["drafter"]
    for policy in policies:
        for gamma in range(1, (max_gamma if causal else ok.shape[0]) + 1):
            counts = np.zeros(4)
            q = first_answer
            while q < last:
                copied = (
                    []
                    if lookup is None or policy == "drafter"
                    else lookup_drafts(tokens[begin : q + 1].tolist(), gamma, lookup)
                )
                kept = 0
                if copied:
                    for s, d in enumerate(copied):
                        if q + 1 + s > last or d != tokens[q + 1 + s]:
                            break
                        kept += 1
                else:
                    while (
                        kept < gamma and q - begin + kept < ok.shape[1] and ok[0 if causal else kept, q - begin + kept]
                    ):
                        kept += 1
                counts += (1, kept + 1, 1, kept >= 1)
                q += kept + 1
            out[f"{policy}@gamma={gamma}"] = counts
    return out
