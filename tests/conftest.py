"""Shared fixtures: tiny random models small enough to compile in a second or two.

The tests come in tiers, one folder each: unit/ (the library on tiny models, the stubs, the import rules; `make
test-quick`), services/ (the gRPC services in process, faults, fuzzing, soak, the benchmark and the load test),
real_model/ (the SmolLM2 GGUF, fetched once into the cache) and deploy/ (Kubernetes manifests, the install script).
This file, helpers.py, reference_numpy.py and data/ serve every tier; they are imported by module name (`from
conftest import TINY`), so a test module's name must be unique across the tiers.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from helpers import sample_documents

import tandem  # noqa: F401  (sets XLA flags before JAX is imported)
from orchestrator.payoff import PayoffConfig
from tandem.config import BatchingConfig, DrafterConfig, LlamaConfig
from tandem.decoding.engine import Engine
from tandem.formats.checkpoints import random_llama_state
from tandem.model import drafter as drafter_model
from tandem.model.primary import LlamaParams, PrimaryRunner, params_from_state_dict


def _session_dir(var: str, prefix: str) -> str | None:
    """Points `var` at a fresh temporary directory for this session (removed at its end), unless the caller set it.
    The services the tests start as processes inherit it."""
    if var in os.environ:
        return None
    os.environ[var] = tempfile.mkdtemp(prefix=prefix)
    return os.environ[var]


# One persistent XLA compilation cache for the session: a shape of the real model compiled in one process (~4 s each)
# is loaded from disk by the next. Set before any compile.
_XLA_CACHE = _session_dir("JAX_COMPILATION_CACHE_DIR", "tandem-test-xla-")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
# The int8 kernel (tandem.model.kernels) is compiled into a fresh directory each session, as on a new machine.
_KERNEL_CACHE = _session_dir("TANDEM_KERNEL_CACHE", "tandem-test-kernels-")


def pytest_sessionfinish(session: pytest.Session) -> None:
    for cache in (_XLA_CACHE, _KERNEL_CACHE):
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


TINY = LlamaConfig(
    vocab_size=48, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=512
)
# For orchestrators in tests that check how requests speculate: never swap speculation for the primary alone on
# timing grounds (orchestrator/payoff.py; tests/services/test_payoff.py turns it on).
SPECULATE_ALWAYS = PayoffConfig(enabled=False)


def tiny_state(cfg: LlamaConfig = TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict whose logits are peaked (std ~3) rather than near-uniform, so argmax ties do not occur."""
    sd = random_llama_state(cfg, seed)
    for name, w in sd.items():
        if w.ndim == 2:
            sd[name] = (w / 0.02 * (1.0 if "embed" in name else w.shape[1] ** -0.5)).astype(np.float32)
    return sd


def drafter_config(tandem_mode: bool, cfg: LlamaConfig = TINY, **kw) -> DrafterConfig:
    base = dict(
        vocab_size=cfg.vocab_size,
        d_model=16,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        ffn_dim=32,
        primary_d_model=cfg.d_model,
        primary_n_layers=cfg.n_layers,
        tandem=tandem_mode,
    )
    base.update(kw)
    return DrafterConfig(**base)


@pytest.fixture(scope="module")
def sample_docs() -> dict[str, list[str]]:
    """tests/data/corpus_sample.txt as two sources (for tests/unit/test_corpus.py and
    tests/real_model/test_smollm2_corpus.py)."""
    return sample_documents()


@pytest.fixture(scope="session")
def tiny_params() -> LlamaParams:
    return params_from_state_dict(TINY, tiny_state())


def make_engine(
    tiny_params: LlamaParams,
    seed: int = 0,
    max_len: int = 256,
    vocab_embed_scale: float = 20.0,
    slots: int = 1,
    batching: BatchingConfig = BatchingConfig(),
    reads: str = "layers",
) -> Engine:
    """A tiny primary with a random Tandem drafter (of the `reads` form) and a random vanilla drafter, `slots`
    sessions each."""
    tcfg, vcfg = drafter_config(True, reads=reads), drafter_config(False)

    def drafter(cfg: DrafterConfig, s: int) -> drafter_model.DrafterRunner:
        p = drafter_model.init_params(cfg, s)
        p = p.replace(embed=p.embed * vocab_embed_scale)  # peaked drafter distributions, like a trained one
        return drafter_model.DrafterRunner(cfg, p, batch=slots, max_len=max_len)

    primary = PrimaryRunner(TINY, tiny_params, taps=tcfg.tapped_layers, batch=slots, max_len=max_len)
    return Engine(primary, drafter(tcfg, seed + 1), drafter(vcfg, seed + 2), batching=batching)


@pytest.fixture(scope="session")
def tiny_engine(tiny_params: LlamaParams) -> Engine:
    return make_engine(tiny_params)
