"""The Hugging Face `transformers` peer (PyTorch on CPU) for the speed benchmark.

The same SmolLM2 weights our engine runs (dequantized from the GGUF by `tandem.formats.checkpoints.load_gguf`, which
already un-permutes llama.cpp's q/k rows back to HF's rotate-half layout) are loaded into a float32 `LlamaForCausalLM`,
and the shipped vanilla drafter is exported as a second `LlamaForCausalLM` for HF *assisted generation* (HF's name for
greedy speculative decoding with a draft model). Nothing is fetched from a model hub: both models are built from
in-memory configs and state dicts (`HF_HUB_OFFLINE=1` is set before `transformers` is imported, unless already set).

Needs the `peer` extra (`pip install -e .[peer]`: torch 2.13 CPU, transformers 5.18).

Layer math, checked against HF Llama (and by tests/real_model/test_peer_hf.py on tiny random models):
    * RMSNorm: `x * rsqrt(mean(x^2) + eps) * w` in float32 on both sides; eps taken from the config (1e-5).
    * RoPE: rotate-half, `inv_freq = theta^(-2j/H)` over the H/2 frequencies, positions 0.. for the prompt; theta from
      the config (100000 for SmolLM2 and the drafters), default rope type (no scaling).
    * Attention: scale H^-1/2, causal; grouped-query with query head n reading key/value head n // G, as HF's
      `repeat_kv` does. A stored drafter's `wq [L, D, K, G, H]` flattens (K, G, H) into HF's `q_proj [K*G*H, D]` rows
      in that order (`tandem.model.layers` keeps the same head order in memory).
    * SwiGLU MLP `down(silu(gate(x)) * up(x))`, pre-norm residual blocks, final norm, head tied to the embedding.

The drafter's head. A drafter with `head_vocab = N` scores only its N `head_ids` (ours puts -1e30 on every other id);
HF's `lm_head` is a bias-free [V, D] linear map, so the export writes the head rows at `head_ids` and zero rows
elsewhere: those tokens score exactly 0. When every head logit is negative a zero-row token wins HF's argmax where ours
would pick a head token. Measured on the shipped vanilla drafter (N = 16384) over 662 positions (four 128-token windows
of the corpus's held-out split and two SmolLM2 chat transcripts): the top head logit was > 0 at every position (smallest
3.5), HF's argmax equalled our JAX drafter's (`tandem.model.drafter.train_forward`) at 662 / 662, and the head logits
differed by at most 1.8e-5. A zero-row win would only cost speed anyway: HF verifies every drafted token, so greedy
output stays the primary's.

Speculation schedule. HF's defaults for an assistant are `num_assistant_tokens=20`, schedule `constant`, and a
confidence stop: drafting ends once the assistant's probability of its own token falls below
`assistant_confidence_threshold=0.4` (HF re-fits that threshold during generation only when scikit-learn is installed;
the peer extra does not install it, so it stays fixed). `DEFAULT_ASSISTED` is constant 7 with threshold 0.8, our
engine's own γ_max = 7 and τ = 0.8 (HF's confidence is the drafter's max probability, our router's fallback), and it
measured fastest of HF default / 7 & 0.4 / 7 & 0.8 / heuristic_transient from 5 without threshold on two chat
prompts x 64 tokens (one torch thread: 9.4-9.8 tokens/s against 8.3-9.4 for the others; all within ~15 %).

Threads. `torch.set_num_threads(2)` by default (this machine's 2 cores). PyTorch's OpenMP GEMMs stall badly when
another process holds one of the cores: with 2 threads and a concurrent job, multi-token forwards (the verification
pass of assisted generation, prompt prefill) ran 10-50x slower (a [2, 576] x [576, 1536] product: 16 ms against
0.3 ms with one thread), so plain greedy fell from ~14 to ~2.5 tokens/s and assisted to < 1. Benchmark on quiet cores,
or pass `threads=1` when they are shared.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build everything from memory; never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file
from transformers.generation.streamers import BaseStreamer
from transformers.initialization import no_init_weights

from benchmark.backends import PeerResult
from tandem.config import DrafterConfig, LlamaConfig
from tandem.decoding.bundle import BundleConfig, drafter_config
from tandem.formats.checkpoints import check_state_dict, hf_config_dict, load_gguf
from tandem.formats.tokenizer import Tokenizer
from tandem.model import drafter as drafter_model

DEFAULT_THREADS = 2  # this machine's cores

# How HF drafts in assisted generation (the assistant's GenerationConfig): at most 7 tokens per round (constant
# schedule), stopping early once the drafter's probability of its own token falls below 0.8 (see the module docstring).
DEFAULT_ASSISTED: dict[str, Any] = {
    "num_assistant_tokens": 7,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.8,
}


def hf_llama_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    """The `transformers.LlamaConfig` of a model shaped like `cfg` (float32, default RoPE, no biases)."""
    return transformers.LlamaConfig(**hf_config_dict(cfg))


def build_hf_llama(cfg: LlamaConfig, state_dict: dict[str, np.ndarray]) -> transformers.LlamaForCausalLM:
    """A float32 `LlamaForCausalLM` in eval mode holding `state_dict`'s weights.

    Args:
        cfg: Model shape.
        state_dict: HF-named float arrays as `tandem.formats.checkpoints` returns them (no `lm_head.weight` when tied).

    Returns:
        The model, on CPU, with `lm_head` sharing the embedding's storage when `cfg.tie_embeddings`.

    Raises:
        ValueError: `state_dict` does not match `cfg`.
    """
    check_state_dict(cfg, state_dict)
    hf_cfg = hf_llama_config(cfg)
    with no_init_weights():  # every weight is overwritten below; skip the random init
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=torch.float32, attn_implementation="sdpa")
    model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    tensors = {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    expected_missing = ["lm_head.weight"] if cfg.tie_embeddings else []
    if sorted(missing) != expected_missing or unexpected:
        raise ValueError(f"state dict does not fit the HF model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise AssertionError("lm_head is not tied to the embedding")
    return model.eval()


def drafter_state_dict(
    drafter_dir: Path, primary_embed: np.ndarray | None
) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """A stored vanilla drafter as a Llama config and HF-named float32 state dict.

    The layers are read from the drafter's on-disk tensors (`tandem.model.drafter.save_drafter`'s stacked einsum layout:
    `wq [L, D, K, G, H]`, `wk`/`wv [L, D, K, H]`, `wo [L, K, G, H, D]`, `w_gate`/`w_up [L, D, F]`, `w_down [L, F, D]`,
    norms `[L, D]`), which stays fixed while the in-memory layout may change. The embedding and the head come from
    `tandem.model.drafter.load_drafter`, so a shared-embedding drafter's table is exactly the one our engine runs
    (`primary_embed @ embed_proj`).

    Args:
        drafter_dir: Holds `config.json` and `model.safetensors`.
        primary_embed: [V, P] the primary's token embedding (needed by a shared-embedding drafter).

    Returns:
        `(config, state_dict)`. A full-vocabulary head is tied to the embedding; a restricted head becomes an untied
        `lm_head.weight` [V, D] with the head rows at `head_ids` and zeros elsewhere (see the module docstring).

    Raises:
        ValueError: A Tandem drafter: it reads the primary's hidden states, which HF's assistant API cannot feed.
    """
    drafter_dir = Path(drafter_dir)
    cfg = DrafterConfig.from_dict(json.loads((drafter_dir / "config.json").read_text()))
    if cfg.tandem:  # refuse before loading anything
        raise ValueError(f"{drafter_dir}: a Tandem drafter reads the primary's hidden states; HF cannot run it")
    _, params = drafter_model.load_drafter(drafter_dir, primary_embed=primary_embed)
    assert params.embed is not None
    stored = {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(drafter_dir / "model.safetensors")).items()}
    d = cfg.d_model
    restricted = params.head_ids is not None
    lcfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        d_model=d,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        ffn_dim=cfg.ffn_dim,
        rope_theta=cfg.rope_theta,
        rms_eps=cfg.rms_eps,
        tie_embeddings=not restricted,
    )
    sd: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(params.embed, np.float32),  # [V, D]
        "model.norm.weight": stored["final_norm"],  # [D]
    }
    for i in range(cfg.n_layers):
        p, w = f"model.layers.{i}.", {name: stored[f"layers.{name}"][i] for name in _STORED_LAYER_NAMES}
        sd[p + "input_layernorm.weight"] = w["attn_norm"]
        sd[p + "post_attention_layernorm.weight"] = w["mlp_norm"]
        sd[p + "self_attn.q_proj.weight"] = w["wq"].reshape(d, -1).T  # [D, K, G, H] -> [K*G*H, D]
        sd[p + "self_attn.k_proj.weight"] = w["wk"].reshape(d, -1).T  # [D, K, H] -> [K*H, D]
        sd[p + "self_attn.v_proj.weight"] = w["wv"].reshape(d, -1).T
        sd[p + "self_attn.o_proj.weight"] = w["wo"].reshape(-1, d).T  # [K, G, H, D] -> [D, K*G*H]
        sd[p + "mlp.gate_proj.weight"] = w["w_gate"].T  # [D, F] -> [F, D]
        sd[p + "mlp.up_proj.weight"] = w["w_up"].T
        sd[p + "mlp.down_proj.weight"] = w["w_down"].T  # [F, D] -> [D, F]
    if restricted:
        assert params.head is not None
        head = np.zeros((cfg.vocab_size, d), np.float32)  # [V, D]
        head[np.asarray(params.head_ids)] = np.asarray(params.head, np.float32)  # [N, D] at the head's ids
        sd["lm_head.weight"] = head
    return lcfg, sd


_STORED_LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def export_drafter_hf(drafter_dir: Path, primary_embed: np.ndarray | None) -> transformers.LlamaForCausalLM:
    """The vanilla drafter stored in `drafter_dir` (by `tandem train` / `tandem.model.drafter.save_drafter`) as an HF
    Llama.

    Args:
        drafter_dir: Holds `config.json` and `model.safetensors`.
        primary_embed: [V, P] the primary's token embedding; a shared-embedding drafter's table is
            `primary_embed @ embed_proj`. Unused otherwise (may be None).

    Returns:
        A float32 `LlamaForCausalLM` in eval mode; see `drafter_state_dict` for the head.

    Raises:
        ValueError: The drafter is a Tandem drafter (cfg.tandem): it reads the primary's states, HF cannot run it.
    """
    return build_hf_llama(*drafter_state_dict(drafter_dir, primary_embed))


class _FirstTokenClock(BaseStreamer):
    """Streamer that notes when generated tokens first arrive (`generate` first puts the prompt itself)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _CallCounter:
    """Counts forward calls of a module through a forward pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1


def _cut_at_stop(tokens: list[int], stop_token_ids: frozenset[int]) -> list[int]:
    """Tokens before the first stop token (our engine does not emit stop tokens)."""
    for i, t in enumerate(tokens):
        if t in stop_token_ids:
            return tokens[:i]
    return tokens


class HFPeer:
    """SmolLM2 (and the vanilla drafter) under Hugging Face `generate()`, greedy, float32, PyTorch on CPU.

    Args:
        bundle_cfg: Where the GGUF is (`gguf_path`; None: the cached SmolLM2). Its other fields are unused except
            `drafter_d_model` / `drafter_layers` / `drafter_seed` when no drafter is shipped (a random vanilla
            drafter is then built exactly like `tandem.decoding.bundle.load_drafters` builds it).
        drafter_dir: The vanilla drafter to export for assisted generation (default: `bundle_cfg.drafters_dir`'s).
        threads: `torch.set_num_threads` (default 2, this machine's cores; the setting is process-wide).
    """

    def __init__(
        self, bundle_cfg: BundleConfig = BundleConfig(), *, drafter_dir: Path | None = None, threads: int | None = None
    ) -> None:
        torch.set_num_threads(threads or DEFAULT_THREADS)
        reader = gguf.GGUFReader(bundle_cfg.resolved_gguf())
        pcfg, state = load_gguf(reader)
        tokenizer = Tokenizer.from_gguf(reader)
        primary = build_hf_llama(pcfg, state)
        embed = state["model.embed_tokens.weight"]
        directory = bundle_cfg.drafters_dir / "vanilla" if drafter_dir is None else Path(drafter_dir)
        if drafter_dir is None and not (directory / "config.json").exists():
            # No shipped drafter: the random one `tandem.decoding.bundle.load_drafters` builds, exported through its
            # files.
            dcfg = drafter_config(pcfg, "vanilla", bundle_cfg)
            with tempfile.TemporaryDirectory() as tmp:
                drafter_model.save_drafter(
                    Path(tmp), dcfg, drafter_model.init_params(dcfg, bundle_cfg.drafter_seed + 1)
                )
                drafter = export_drafter_hf(Path(tmp), embed)
        else:
            drafter = export_drafter_hf(directory, embed)
        del state
        self._setup(primary, drafter, tokenizer.stop_token_ids, tokenizer)

    @classmethod
    def from_models(
        cls,
        primary: transformers.LlamaForCausalLM,
        drafter: transformers.LlamaForCausalLM | None,
        stop_token_ids: Sequence[int] = (),
        threads: int | None = None,
    ) -> HFPeer:
        """A peer over models built elsewhere (tests use tiny random ones)."""
        torch.set_num_threads(threads or DEFAULT_THREADS)
        peer = cls.__new__(cls)
        peer._setup(primary, drafter, stop_token_ids, None)
        return peer

    def _setup(
        self,
        primary: transformers.LlamaForCausalLM,
        drafter: transformers.LlamaForCausalLM | None,
        stop_token_ids: Sequence[int],
        tokenizer: Tokenizer | None,
    ) -> None:
        self.primary, self.drafter = primary.eval(), drafter.eval() if drafter is not None else None
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.tokenizer = tokenizer  # None for models built elsewhere
        self._primary_calls = _CallCounter(primary)
        self._drafter_calls = _CallCounter(drafter) if drafter is not None else None
        stops = sorted(self.stop_token_ids)
        # Greedy, nothing else: no repetition penalty, no length constraints; explicit eos so HF takes none from the
        # model config (an empty stop set generates exactly max_new_tokens, like our engine without stop ids).
        self.generation_config = transformers.GenerationConfig(
            do_sample=False,
            num_beams=1,
            eos_token_id=stops or None,
            pad_token_id=stops[0] if stops else 0,
            bos_token_id=None,
            repetition_penalty=1.0,
        )
        primary.generation_config = self.generation_config
        if drafter is not None:
            drafter.generation_config = transformers.GenerationConfig(**DEFAULT_ASSISTED)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int, *, assisted: bool) -> PeerResult:
        """Greedy generation of up to `max_tokens` tokens after `prompt_ids`.

        Args:
            prompt_ids: [T] prompt token ids (non-empty).
            max_tokens: Most tokens to generate (>= 1); a stop token ends earlier and is not returned.
            assisted: Use HF assisted generation with the exported drafter (lossless: the same tokens as plain
                greedy, up to float rounding between a one-token and a multi-token forward).

        Returns:
            The tokens and timings (`benchmark.backends.PeerResult`). ttft_s runs to the first token reaching the
            streamer: plain greedy, the prefill's forward; assisted, the first round (the drafter's prefill and drafts
            and the primary's verification of them: HF emits tokens only once verified).

        Raises:
            ValueError: Empty prompt, max_tokens < 1, or `assisted` without a drafter.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if assisted and self.drafter is None:
            raise ValueError("assisted generation needs a drafter")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, T]
        clock = _FirstTokenClock()
        primary_before = self._primary_calls.calls
        drafter_before = self._drafter_calls.calls if self._drafter_calls is not None else 0
        start = time.perf_counter()
        gen_cfg = copy.deepcopy(self.generation_config)
        gen_cfg.max_new_tokens = max_tokens
        with torch.inference_mode():
            out = self.primary.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=gen_cfg,
                assistant_model=self.drafter if assisted else None,
                streamer=clock,
            )
        elapsed = time.perf_counter() - start
        new = [int(t) for t in out[0, ids.shape[1] :].tolist()]
        first = clock.first_token_at if clock.first_token_at is not None else start + elapsed
        drafter_calls = (self._drafter_calls.calls - drafter_before) if self._drafter_calls is not None else 0
        return PeerResult(
            token_ids=_cut_at_stop(new, self.stop_token_ids),
            ttft_s=first - start,
            elapsed_s=elapsed,
            assistant_calls=drafter_calls,
            primary_calls=self._primary_calls.calls - primary_before,
        )

    def warmup(self) -> None:
        """One short generation of each kind (first calls pay PyTorch's one-time allocations and dispatch)."""
        prompt = [1, 2, 3, 4]
        self.generate(prompt, 4, assisted=False)
        if self.drafter is not None:
            self.generate(prompt, 4, assisted=True)

    def describe(self) -> dict[str, Any]:
        """Versions and threads, for the benchmark's JSON."""
        return {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        }
