"""The bundled models: the real SmolLM2 primary plus the Tandem and vanilla drafters, assembled into an Engine.

Drafter weights shipped inside the package (`tandem/weights/<name>/`) are used when present; until the training issue
ships them, drafters are initialised randomly from a fixed seed (SPEED stays lossless, only slower).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import jax.numpy as jnp

from tandem import secondary
from tandem.assets import smollm2_gguf_path
from tandem.checkpoints import load_gguf
from tandem.config import DrafterConfig, LlamaConfig
from tandem.engine import Engine
from tandem.primary import PrimaryRunner, params_from_state_dict
from tandem.tokenizer import Tokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """What `load_bundle` builds."""

    gguf_path: Path | None = None  # None: the SmolLM2 GGUF fetched into the cache by tandem.assets
    max_len: int = 2048  # KV cache slots per sequence (prompt + generated + one padded block)
    drafter_d_model: int = 256  # shape of randomly initialised drafters (shipped ones carry their own config)
    drafter_layers: int = 4
    drafter_seed: int = 0


@dataclasses.dataclass
class Bundle:
    engine: Engine
    tokenizer: Tokenizer
    primary_config: LlamaConfig
    drafter_sources: dict[str, str]  # "tandem"/"vanilla" -> "shipped <dir>" or "random seed N"


def default_drafter_config(primary: LlamaConfig, tandem: bool, d_model: int = 256, n_layers: int = 4) -> DrafterConfig:
    """A drafter sized for this CPU (DESIGN.md: d = 256, 4 layers costs ~3.4 ms per token with the full head)."""
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


def _drafter(
    primary: LlamaConfig, name: str, tandem: bool, cfg: BundleConfig
) -> tuple[DrafterConfig, secondary.DrafterParams, str]:
    shipped = WEIGHTS_DIR / name
    if (shipped / "config.json").exists():
        dcfg, params = secondary.load_drafter(shipped)
        return dcfg, params, f"shipped {shipped}"
    dcfg = default_drafter_config(primary, tandem, cfg.drafter_d_model, cfg.drafter_layers)
    seed = cfg.drafter_seed + (0 if tandem else 1)
    return dcfg, secondary.init_params(dcfg, seed), f"random seed {seed}"


def load_bundle(cfg: BundleConfig = BundleConfig()) -> Bundle:
    """Loads the primary from GGUF, its tokenizer, and both drafters; returns a ready in-process engine."""
    path = cfg.gguf_path or smollm2_gguf_path()
    reader = gguf.GGUFReader(path)
    pcfg, state = load_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    tcfg, tparams, tsrc = _drafter(pcfg, "tandem", True, cfg)
    vcfg, vparams, vsrc = _drafter(pcfg, "vanilla", False, cfg)
    primary = PrimaryRunner(
        pcfg, params_from_state_dict(pcfg, state, jnp.float32), taps=tcfg.tapped_layers, max_len=cfg.max_len
    )
    engine = Engine(
        primary,
        secondary.DrafterRunner(tcfg, tparams, max_len=cfg.max_len),
        secondary.DrafterRunner(vcfg, vparams, max_len=cfg.max_len),
        stop_token_ids=tokenizer.stop_token_ids,
    )
    return Bundle(engine, tokenizer, pcfg, {"tandem": tsrc, "vanilla": vsrc})
