"""The bundled models: the real SmolLM2 primary plus the Tandem and vanilla drafters.

Drafter weights shipped inside the package (`tandem/weights/<name>/`) are used when present; until the training issue
ships them, drafters are initialised randomly from a fixed seed (SPEED stays lossless, only slower). The services
load their halves with `load_primary` / `load_drafters`; the in-process engine takes both through `load_bundle`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax.numpy as jnp

from tandem import secondary
from tandem.assets import smollm2_gguf_path
from tandem.checkpoints import gguf_config, load_gguf
from tandem.config import DrafterConfig, LlamaConfig
from tandem.engine import Engine
from tandem.primary import PrimaryRunner, params_from_state_dict
from tandem.tokenizer import Tokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
DRAFTERS = {"tandem": True, "vanilla": False}  # name -> reads the primary's states


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """Which models to load and how large their caches are."""

    gguf_path: Path | None = None  # None: the SmolLM2 GGUF fetched into the cache by tandem.assets
    max_len: int = 2048  # KV cache positions per sequence (prompt + generated + one block)
    slots: int = 1  # concurrent sequences per cache
    drafter_d_model: int = 256  # shape of randomly initialised drafters (shipped ones carry their own config)
    drafter_layers: int = 4
    drafter_seed: int = 0

    def resolved_gguf(self) -> Path:
        return self.gguf_path or smollm2_gguf_path()


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


def drafter_config(primary: LlamaConfig, name: str, cfg: BundleConfig) -> DrafterConfig:
    """The config of drafter `name` ("tandem" or "vanilla"): the shipped one, else the default shape."""
    shipped = WEIGHTS_DIR / name / "config.json"
    if shipped.exists():
        return DrafterConfig.from_dict(json.loads(shipped.read_text()))
    return default_drafter_config(primary, DRAFTERS[name], cfg.drafter_d_model, cfg.drafter_layers)


def primary_config(cfg: BundleConfig) -> LlamaConfig:
    """The primary's config from the GGUF metadata alone (no weights read)."""
    return gguf_config(gguf.GGUFReader(cfg.resolved_gguf()))


def load_primary(cfg: BundleConfig) -> tuple[PrimaryRunner, Tokenizer]:
    """The primary with one cache slot per concurrent sequence, tapping the layers the Tandem drafter reads."""
    reader = gguf.GGUFReader(cfg.resolved_gguf())
    pcfg, state = load_gguf(reader)
    taps = drafter_config(pcfg, "tandem", cfg).tapped_layers
    params = params_from_state_dict(pcfg, state, jnp.float32)
    runner = PrimaryRunner(pcfg, params, taps=taps, batch=cfg.slots, max_len=cfg.max_len)
    return runner, Tokenizer.from_gguf(reader)


def load_drafters(primary: LlamaConfig, cfg: BundleConfig) -> tuple[dict[str, secondary.DrafterRunner], dict[str, str]]:
    """Both drafters with their caches, and where each one's weights came from."""
    runners, sources = {}, {}
    for i, name in enumerate(DRAFTERS):
        shipped = WEIGHTS_DIR / name
        if (shipped / "config.json").exists():
            dcfg, params = secondary.load_drafter(shipped)
            sources[name] = f"shipped {shipped}"
        else:
            dcfg = drafter_config(primary, name, cfg)
            params = secondary.init_params(dcfg, cfg.drafter_seed + i)
            sources[name] = f"random seed {cfg.drafter_seed + i}"
        runners[name] = secondary.DrafterRunner(dcfg, params, batch=cfg.slots, max_len=cfg.max_len)
    return runners, sources


def load_bundle(cfg: BundleConfig = BundleConfig()) -> Bundle:
    """The primary, its tokenizer and both drafters as one in-process engine."""
    primary, tokenizer = load_primary(cfg)
    drafters, sources = load_drafters(primary.cfg, cfg)
    engine = Engine(primary, drafters["tandem"], drafters["vanilla"], stop_token_ids=tokenizer.stop_token_ids)
    return Bundle(engine, tokenizer, primary.cfg, sources)
