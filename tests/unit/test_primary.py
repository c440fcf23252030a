"""The primary's block forward: equal to token-by-token decoding, to an independent NumPy forward, and to itself
after a safetensors round trip."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, tiny_state
from reference_numpy import reference_forward

from tandem.formats.checkpoints import load_hf_safetensors, save_hf_safetensors
from tandem.model.kvcache import KVCache
from tandem.model.primary import PrimaryRunner, params_from_state_dict

TAPS = (1, 3, 4)


def runner(params, batch: int = 1, max_len: int = 128) -> PrimaryRunner:
    return PrimaryRunner(TINY, params, taps=TAPS, batch=batch, max_len=max_len)


def test_matches_numpy_reference(tiny_params) -> None:
    ids = [3, 17, 9, 40, 2, 11, 5, 23, 8, 1]
    ref_logits, ref_hidden = reference_forward(TINY, tiny_state(), ids)
    out = runner(tiny_params).forward(np.asarray([ids]))
    np.testing.assert_allclose(out.logits[0], ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
    np.testing.assert_allclose(out.hidden[0], np.stack([ref_hidden[t] for t in TAPS], axis=1), atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_block_equals_token_by_token(tiny_params, batch: int) -> None:
    rng = np.random.default_rng(batch)
    prefix = rng.integers(0, TINY.vocab_size, size=(batch, 5))
    stepwise = runner(tiny_params, batch)
    stepwise.forward(prefix)
    for row in range(batch):
        stepwise.commit(row, 5)
    seq = rng.integers(0, TINY.vocab_size, size=(batch, 8))
    step_logits, step_hidden = [], []
    for t in range(8):
        out = stepwise.forward(seq[:, t : t + 1])
        for row in range(batch):
            stepwise.commit(row, 1)
        step_logits.append(out.logits[:, 0])
        step_hidden.append(out.hidden[:, 0])
    step_logits, step_hidden = np.stack(step_logits, 1), np.stack(step_hidden, 1)  # [B, 8, V], [B, 8, n, D]
    for k in range(1, 9):
        block = runner(tiny_params, batch)
        block.forward(prefix)
        for row in range(batch):
            block.commit(row, 5)
        out = block.forward(seq[:, :k])
        np.testing.assert_allclose(out.logits, step_logits[:, :k], atol=2e-4, err_msg=f"k={k}")
        np.testing.assert_allclose(out.hidden, step_hidden[:, :k], atol=2e-4, err_msg=f"k={k}")


def test_ragged_rows_and_rollback(tiny_params) -> None:
    """Rows with different cached lengths in one call give each row's own single-row result; rollback forgets."""
    a, b = [5, 6, 7, 8, 9, 10], [11, 12]
    single = []
    for ids in (a, b):
        r = runner(tiny_params)
        r.forward(np.asarray([ids]))
        r.commit(0, len(ids))
        single.append(r.forward(np.asarray([[4, 2]])).logits[0])
    both = runner(tiny_params, batch=2)
    both.forward(np.asarray([a, b + [0] * 4]))
    both.commit(0, 6)
    both.commit(1, 2)
    out = both.forward(np.asarray([[4, 2], [4, 2]]))
    np.testing.assert_allclose(out.logits[0], single[0], atol=2e-4)
    np.testing.assert_allclose(out.logits[1], single[1], atol=2e-4)
    # Commit a wrong token then roll back: the next pass equals one that never saw it.
    both.commit(0, 1)
    both.truncate(0, 6)
    again = both.forward(np.asarray([[4, 2], [4, 2]]))
    np.testing.assert_allclose(again.logits[0], single[0], atol=2e-4)


def test_context_full_is_an_error(tiny_params) -> None:
    r = runner(tiny_params, max_len=16)
    r.forward(np.zeros((1, 12), np.int64))
    r.commit(0, 12)
    with pytest.raises(ValueError, match="context full"):
        r.forward(np.zeros((1, 5), np.int64))


def test_safetensors_round_trip_gives_same_logits(tiny_params, tmp_path) -> None:
    save_hf_safetensors(tmp_path, TINY, tiny_state())
    cfg, sd = load_hf_safetensors(tmp_path)
    assert cfg == TINY
    ids = np.asarray([[1, 2, 3, 4]])
    want = runner(tiny_params).forward(ids).logits
    got = PrimaryRunner(cfg, params_from_state_dict(cfg, sd), taps=TAPS).forward(ids).logits
    np.testing.assert_array_equal(got, want)


def test_importing_tandem_turns_on_in_place_cache_updates() -> None:
    """Without region analysis XLA copies the donated KV cache on every call (2-3x slower decode steps here)."""
    import os

    import tandem

    assert tandem._XLA_FLAG in os.environ["XLA_FLAGS"].split()


def test_a_cache_every_call_reads_whole_keeps_only_the_prefix_segment_apart() -> None:
    """Segments exist for calls that read part of the cache; under the fixed-order kernel (attend_all) every call
    reads it whole, so each layer holds the prefix cache's first segment and one for the rest (fewer buffers a call
    passes and returns)."""
    segmented = KVCache(2, 1, 512, 1, 8, jnp.float32)
    whole = KVCache(2, 1, 512, 1, 8, jnp.float32, attend_all=True)
    assert [b.shape[2] for b in segmented.k[0]] == [64, 64, 128, 256]
    assert [b.shape[2] for b in whole.k[0]] == [64, 448] and [b.shape[2] for b in whole.v[1]] == [64, 448]
    assert whole.attend_buckets() == [512] and whole.attend_len(np.array([0])) == 512
