"""The llama.cpp peer: llama.cpp runs the GGUF our primary loads, on our own chat-templated token ids, to the same
greedy tokens as our engine's `primary` mode, and stops at our stop tokens.

The prompt is one without near ties: along our primary's answer to it ("The cat sat on the mat." and the stop token)
the top logit leads the second by at least 0.88 at every position (our float32 forward). llama.cpp's logits differ
from ours by rounding (its own 8-bit input blocks, float16 KV cache, summation order; see benchmark/peer_llamacpp.py),
which flips the greedy token where the two leading ones are close: on "What is the capital of France?" they are 0.08
apart and the two implementations part at the first token. So the agreement is asserted on this prompt, in full.

Skipped without llama-cpp-python (the `llamacpp` extra, built by docker/build-llamacpp.sh).
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

from benchmark.peer_llamacpp import LlamaCppPeer
from tandem.decoding.bundle import BundleConfig, load_primary
from tandem.decoding.engine import Engine

pytestmark = pytest.mark.real_model

TOKENS = 16
PROMPT = "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."


@pytest.fixture(scope="module")
def ids_and_want() -> tuple[list[int], list[int], str]:
    """The prompt's token ids, and our served primary's greedy answer to it (8-bit inputs to its products where the
    kernel runs, as the bench's primary) with its finish reason."""
    runner, tokenizer = load_primary(BundleConfig(max_len=256))
    engine = Engine(runner, stop_token_ids=tokenizer.stop_token_ids, prefix_rows=0)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    result = engine.generate(ids, mode="primary", max_tokens=TOKENS)
    return ids, list(result.token_ids), result.finish_reason


@pytest.fixture(scope="module")
def peer() -> LlamaCppPeer:
    return LlamaCppPeer(BundleConfig(max_len=256), threads=1)  # one thread: robust on shared cores


def test_greedy_tokens_and_stop_equal_engine_primary(ids_and_want, peer: LlamaCppPeer) -> None:
    ids, want, finish = ids_and_want
    assert finish == "stop" and 0 < len(want) < TOKENS  # the answer ends with a stop token
    plain = peer.generate(ids, TOKENS, assisted=False)
    assert plain.token_ids == want  # the stop token ended it and is not returned
    assert 0 < plain.ttft_s <= plain.elapsed_s
    # The prompt's decode, then one per token: the last one's decode gave the stop token.
    assert plain.primary_calls == len(want) + 1 and plain.rounds == 0 and plain.assistant_calls == 0
    assert peer.generate(ids, 3, assisted=False).token_ids == want[:3]  # max_tokens cuts it


def test_prompt_lookup_drafts_and_keeps_the_tokens(ids_and_want, peer: LlamaCppPeer) -> None:
    ids, want, _ = ids_and_want
    lookup = peer.generate(ids, TOKENS, assisted=True)
    assert lookup.token_ids == want
    assert lookup.lookup and lookup.rounds > 0 and 0 < lookup.accepted_tokens <= lookup.drafted_tokens
    assert sum(lookup.accepted_per_position) == lookup.accepted_tokens
    assert lookup.primary_calls < len(want) + 1  # kept drafts save decodes
    assert lookup.assistant_calls == 0  # no draft model runs


def test_a_context_too_small_is_refused(peer: LlamaCppPeer) -> None:
    with pytest.raises(ValueError, match=r"exceed llama\.cpp's context of 256"):
        peer.generate([1] * 200, 57, assisted=False)
