"""The bundled models: the real SmolLM2 primary plus the Tandem and vanilla drafters.

The drafters trained by `tandem train` ship inside the package (`tandem/weights/<name>/`, each with its router) and
are used when present; without them a drafter is initialised randomly from a fixed seed (SPEED stays lossless, only
slower). Shipped drafters derive their embedding from the primary's, so the Secondary service reads that one tensor
of the GGUF too. The services
load their halves with `load_primary` / `load_drafters`; the in-process engine takes both through `load_bundle`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from tandem.config import DrafterConfig, LlamaConfig
from tandem.decoding.engine import Engine
from tandem.decoding.speculative import Router
from tandem.formats.assets import smollm2_gguf_path
from tandem.formats.checkpoints import gguf_config, gguf_quant_blocks, load_gguf
from tandem.formats.tokenizer import Tokenizer
from tandem.model import drafter as drafter_model
from tandem.model import kernels
from tandem.model.primary import LlamaParams, PrimaryRunner, params_from_state_dict
from tandem.model.router import MLPRouter, load_router

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"  # tandem/weights: data shipped with the package
DRAFTERS = {"tandem": True, "vanilla": False}  # name -> reads the primary's states
DRAFTERS_ENV = "TANDEM_DRAFTERS"  # another directory of drafters for every process (benchmarks of other drafters)


def default_drafters_dir() -> Path:
    """Where drafters load from: $TANDEM_DRAFTERS if set (so the three services of a stack agree), else the shipped
    ones."""
    return Path(os.environ.get(DRAFTERS_ENV) or WEIGHTS_DIR)


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """Which models to load and how large their caches are."""

    gguf_path: Path | None = None  # None: the SmolLM2 GGUF fetched into the cache by tandem.formats.assets
    drafters_dir: Path = dataclasses.field(default_factory=default_drafters_dir)  # holds tandem/ and vanilla/
    max_len: int = 2048  # KV cache positions per sequence (prompt + generated + one block)
    slots: int = 1  # concurrent sequences per cache
    drafter_d_model: int = 256  # shape of randomly initialised drafters (shipped ones carry their own config)
    drafter_layers: int = 4
    drafter_seed: int = 0
    prefix_rows: int = 4  # the primary's prefix cache rows (tandem.model.kvcache.PrefixCache); 0 = off
    # drafters' products as Q8_0 for the int8 kernel, where it runs, with 8-bit inputs when the primary's take them
    # (tandem.model.drafter.quantize)
    quantize_drafters: bool = True
    # the primary's Q4_1 layer and Q8_0 head products take 8-bit inputs and integer dot products, where the kernel runs
    # (tandem.model.primary.params_from_state_dict); lossless because the pass runs in the kernels' fixed order
    # (PrimaryRunner.fixed_order), which makes a token's outputs bitwise the same in any block and batch
    int8_activations: bool = True

    def resolved_gguf(self) -> Path:
        return self.gguf_path or smollm2_gguf_path()


@dataclasses.dataclass
class Bundle:
    engine: Engine
    tokenizer: Tokenizer
    primary_config: LlamaConfig
    drafter_sources: dict[str, str]  # "tandem"/"vanilla" -> "shipped <dir>" or "random seed N"


def default_drafter_config(primary: LlamaConfig, tandem: bool, d_model: int = 256, n_layers: int = 4) -> DrafterConfig:
    """A drafter sized for this CPU: d = 256, 4 layers costs ~3.4 ms per token with the full head (docs/design.md,
    Measured facts about the CPU)."""
    return DrafterConfig(
        vocab_size=primary.vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // 64,
        n_kv_heads=max(1, d_model // 128),
        head_dim=64,
        ffn_dim=3 * d_model,
        rope_theta=primary.rope_theta,
        tandem=tandem,
        primary_d_model=primary.d_model,
        primary_n_layers=primary.n_layers,
    )


def drafter_config(primary: LlamaConfig, name: str, cfg: BundleConfig) -> DrafterConfig:
    """The config of drafter `name` ("tandem" or "vanilla"): the stored one, else the default shape."""
    shipped = cfg.drafters_dir / name / "config.json"
    if shipped.exists():
        return DrafterConfig.from_dict(json.loads(shipped.read_text()))
    return default_drafter_config(primary, DRAFTERS[name], cfg.drafter_d_model, cfg.drafter_layers)


def primary_config(cfg: BundleConfig) -> LlamaConfig:
    """The primary's config from the GGUF metadata alone (no weights read)."""
    return gguf_config(gguf.GGUFReader(cfg.resolved_gguf()))


def load_primary_params(cfg: BundleConfig) -> tuple[LlamaConfig, LlamaParams, Tokenizer]:
    """The primary's config, float32 weights and tokenizer from the GGUF; where the int8 kernel runs
    (`tandem.model.kernels.available()`), the quantized matrices also keep their integer panels."""
    reader = gguf.GGUFReader(cfg.resolved_gguf())
    pcfg, state = load_gguf(reader)
    blocks = gguf_quant_blocks(reader) if kernels.available() else None
    params = params_from_state_dict(pcfg, state, jnp.float32, blocks=blocks, int8_activations=cfg.int8_activations)
    return pcfg, params, Tokenizer.from_gguf(reader)


def load_primary(cfg: BundleConfig) -> tuple[PrimaryRunner, Tokenizer]:
    """The primary with one cache slot per concurrent sequence, tapping the layers the Tandem drafter reads."""
    pcfg, params, tokenizer = load_primary_params(cfg)
    taps = drafter_config(pcfg, "tandem", cfg).tapped_layers
    runner = PrimaryRunner(pcfg, params, taps=taps, batch=cfg.slots, max_len=cfg.max_len)
    return runner, tokenizer


def primary_embedding(cfg: BundleConfig) -> np.ndarray:
    """[V, P] the primary's token embedding alone (what shared-embedding drafters derive their tables from)."""
    return load_gguf(gguf.GGUFReader(cfg.resolved_gguf()), only=("model.embed_tokens.weight",))[1][
        "model.embed_tokens.weight"
    ]


def load_drafter_dir(
    directory: Path, primary_embed: np.ndarray | jax.Array | None, with_router: bool = True
) -> tuple[DrafterConfig, drafter_model.DrafterParams, Router | None]:
    """A drafter written by `tandem train` and, if stored beside it, its router."""
    dcfg, params = drafter_model.load_drafter(directory, primary_embed=primary_embed)
    stored = load_router(directory) if with_router else None
    assert params.embed is not None
    router = MLPRouter(*stored, np.asarray(params.embed)) if stored is not None else None
    return dcfg, params, router


def load_drafters(
    primary: LlamaConfig, cfg: BundleConfig, primary_embed: np.ndarray | jax.Array | None = None
) -> tuple[dict[str, drafter_model.DrafterRunner], dict[str, Router | None], dict[str, str]]:
    """Both drafters with their caches, their routers (None: max-probability fallback) and where each came from.

    Args:
        primary: the primary's config.
        cfg: the bundle.
        primary_embed: [V, P] the primary's embedding, read from the GGUF when a shipped drafter needs it and it is
            not given.
    """
    runners: dict[str, drafter_model.DrafterRunner] = {}
    routers: dict[str, Router | None] = {}
    sources: dict[str, str] = {}
    for i, name in enumerate(DRAFTERS):
        shipped = cfg.drafters_dir / name
        router: Router | None = None
        if (shipped / "config.json").exists():
            if primary_embed is None and drafter_config(primary, name, cfg).shared_embed:
                primary_embed = primary_embedding(cfg)
            dcfg, params, router = load_drafter_dir(shipped, primary_embed)
            sources[name] = f"shipped {shipped}" + (" + router" if router is not None else "")
        else:
            dcfg = drafter_config(primary, name, cfg)
            params = drafter_model.init_params(dcfg, cfg.drafter_seed + i)
            sources[name] = f"random seed {cfg.drafter_seed + i}"
        if cfg.quantize_drafters and kernels.available():
            params = drafter_model.quantize(params, int8_activations=cfg.int8_activations)
        runners[name] = drafter_model.DrafterRunner(dcfg, params, batch=cfg.slots, max_len=cfg.max_len)
        routers[name] = router
    return runners, routers, sources


def load_bundle(cfg: BundleConfig = BundleConfig()) -> Bundle:
    """The primary, its tokenizer and both drafters as one in-process engine."""
    primary, tokenizer = load_primary(cfg)
    drafters, routers, sources = load_drafters(primary.cfg, cfg, primary.params.embed)
    engine = Engine(
        primary,
        drafters["tandem"],
        drafters["vanilla"],
        routers=routers,
        stop_token_ids=tokenizer.stop_token_ids,
        prefix_rows=cfg.prefix_rows,
    )
    return Bundle(engine, tokenizer, primary.cfg, sources)
