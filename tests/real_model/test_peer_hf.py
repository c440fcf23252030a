"""The Hugging Face transformers peer: the same models as our engine, run by HF, give the same tokens.

Skipped without the `peer` extra (torch + transformers).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY, drafter_config, tiny_state  # noqa: E402
from test_real_model import bundle  # noqa: E402, F401  (the real-model fixture, loaded once per module)

from benchmark import peer_hf  # noqa: E402
from tandem.decoding.bundle import Bundle, BundleConfig, load_bundle  # noqa: E402
from tandem.decoding.engine import Engine  # noqa: E402
from tandem.model import drafter as drafter_model  # noqa: E402
from tandem.model.primary import LlamaParams, PrimaryRunner, forward_sequence  # noqa: E402

PROMPTS = ([3, 17, 9], [5, 6, 7, 8, 9, 10], [40, 2, 11, 5, 23, 8, 1, 30, 31])
HEAD_VOCAB = 24  # the tiny drafter's restricted head: half of TINY's 48 ids


@pytest.fixture(scope="module")
def hf_primary() -> peer_hf.transformers.LlamaForCausalLM:
    return peer_hf.build_hf_llama(TINY, tiny_state())


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny vanilla drafter with a shared embedding and a restricted head, as `tandem train` stores one."""
    cfg = drafter_config(False, shared_embed=True, head_vocab=HEAD_VOCAB)
    params = drafter_model.init_params(cfg, seed=5)
    params = params.replace(head_ids=np.random.default_rng(5).permutation(TINY.vocab_size)[:HEAD_VOCAB])
    directory = tmp_path_factory.mktemp("vanilla")
    drafter_model.save_drafter(directory, cfg, params)
    return directory


@pytest.fixture(scope="module")
def peer(hf_primary, drafter_dir: Path) -> peer_hf.HFPeer:
    drafter = peer_hf.export_drafter_hf(drafter_dir, tiny_state()["model.embed_tokens.weight"])
    return peer_hf.HFPeer.from_models(hf_primary, drafter, threads=1)


def test_hf_llama_matches_our_forward(hf_primary, tiny_params: LlamaParams) -> None:
    ids = np.asarray([[3, 17, 9, 40, 2, 11, 5, 23, 8, 1, 30, 31]])
    want, _ = jax.jit(forward_sequence, static_argnames=("cfg", "taps"))(tiny_params, ids, cfg=TINY, taps=(1,))
    with torch.inference_mode():
        got = hf_primary(torch.as_tensor(ids)).logits.numpy()
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    assert hf_primary.lm_head.weight.data_ptr() == hf_primary.model.embed_tokens.weight.data_ptr()  # tied


def test_greedy_tokens_equal_engine_primary_mode(peer: peer_hf.HFPeer, tiny_engine: Engine) -> None:
    for prompt in PROMPTS:
        want = tiny_engine.generate(prompt, mode="primary", max_tokens=20).token_ids
        got = peer.generate(prompt, 20, assisted=False)
        assert got.token_ids == want, prompt
        assert got.assistant_calls == 0 and got.primary_calls == 20
        assert 0 < got.ttft_s <= got.elapsed_s


def test_stop_tokens_end_like_the_engine(hf_primary, tiny_params: LlamaParams) -> None:
    """A stop token ends the generation and is not returned, as in `tandem.decoding.rounds.run_request`."""
    prompt = PROMPTS[1]
    free = peer_hf.HFPeer.from_models(hf_primary, None, threads=1).generate(prompt, 20, assisted=False).token_ids
    stop = free[3]
    engine = Engine(PrimaryRunner(TINY, tiny_params, taps=(1,), max_len=64), stop_token_ids=(stop,))
    want = engine.generate(prompt, mode="primary", max_tokens=20).token_ids
    got = peer_hf.HFPeer.from_models(hf_primary, None, stop_token_ids=(stop,), threads=1)
    assert got.generate(prompt, 20, assisted=False).token_ids == want == free[: free.index(stop)]


def test_exported_drafter_matches_train_forward(drafter_dir: Path) -> None:
    embed = tiny_state()["model.embed_tokens.weight"]
    cfg, params = drafter_model.load_drafter(drafter_dir, primary_embed=embed)
    hf = peer_hf.export_drafter_hf(drafter_dir, embed)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(1, 40))
    forward = jax.jit(drafter_model.train_forward, static_argnames=("cfg", "block_len"))
    want = np.asarray(forward(params, cfg, tokens, None, block_len=1))[0]  # [T, V]
    with torch.inference_mode():
        got = hf(torch.as_tensor(tokens)).logits.numpy()[0]  # [T, V]
    head_ids = np.asarray(params.head_ids)
    others = np.setdiff1d(np.arange(TINY.vocab_size), head_ids)
    np.testing.assert_allclose(got[:, head_ids], want[:, head_ids], atol=1e-4 * np.abs(want[:, head_ids]).max())
    assert not got[:, others].any()  # ids outside the head score exactly 0 (ours: -1e30)
    positive = got[:, head_ids].max(axis=-1) > 0
    assert positive.sum() >= len(positive) // 2
    np.testing.assert_array_equal(got.argmax(-1)[positive], want.argmax(-1)[positive])


def test_a_tandem_drafter_is_refused(tmp_path: Path) -> None:
    cfg = drafter_config(True)
    drafter_model.save_drafter(tmp_path, cfg, drafter_model.init_params(cfg))
    with pytest.raises(ValueError, match="Tandem drafter"):
        peer_hf.export_drafter_hf(tmp_path, None)


def test_assisted_generation_is_lossless(peer: peer_hf.HFPeer, hf_primary) -> None:
    """With the exported drafter (mostly rejected) and with the primary as its own assistant (always accepted)."""
    perfect = peer_hf.HFPeer.from_models(hf_primary, peer_hf.build_hf_llama(TINY, tiny_state()), threads=1)
    for prompt in PROMPTS:
        want = peer.generate(prompt, 20, assisted=False).token_ids
        drafted = peer.generate(prompt, 20, assisted=True)
        assert drafted.token_ids == want, prompt
        assert drafted.assistant_calls > 0
        same = perfect.generate(prompt, 20, assisted=True)
        assert same.token_ids == want, prompt
        assert same.primary_calls < 20  # rounds that accepted several drafted tokens


def test_describe(peer: peer_hf.HFPeer) -> None:
    assert peer.describe() == {
        "torch": torch.__version__,
        "transformers": peer_hf.transformers.__version__,
        "threads": 1,
    }


@pytest.mark.real_model
@pytest.mark.slow
def test_real_smollm2_greedy_equals_engine(bundle: Bundle) -> None:  # noqa: F811
    """HF runs the GGUF's weights to the same 16 greedy tokens as our engine's `primary` mode with float inputs to its
    products (HF has no 8-bit inputs), plain and assisted."""
    hf = peer_hf.HFPeer(BundleConfig(max_len=256), threads=1)  # one thread: robust on shared cores
    tok = bundle.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    engine = load_bundle(BundleConfig(max_len=256, int8_activations=False)).engine
    want = engine.generate(ids, mode="primary", max_tokens=16).token_ids
    assert hf.generate(ids, 16, assisted=False).token_ids == want
    assert hf.generate(ids, 16, assisted=True).token_ids == want
