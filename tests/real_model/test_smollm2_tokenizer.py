"""The real SmolLM2 tokenizer: golden ids from two independent tokenizers, special tokens, the chat template, streaming
decode."""

from __future__ import annotations

import pytest
from helpers import stream_decode

from tandem.formats.assets import smollm2_gguf_path
from tandem.formats.tokenizer import Tokenizer

# -------------------------------------------------------------------------------------------- real SmolLM2

# Token ids produced by two independent tokenizers reading this same GGUF file: Hugging Face transformers 5.23
# (AutoTokenizer.from_pretrained(dir, gguf_file=...)) and llama.cpp (llama-cpp-python 0.3.36, special=True), which
# agree on every entry. The last group comes from llama.cpp alone (digits, odd numerals, whitespace runs).
GOLDEN = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello, world! How are you today?": [19556, 28, 905, 17, 1073, 359, 346, 1834, 47],
    "  leading spaces and trailing   ": [216, 2899, 5600, 284, 35079, 333],
    "tabs\tand\nnewlines\r\n\n\nmixed": [100, 7366, 197, 397, 198, 2241, 5110, 201, 1116, 198, 35781],
    "I'm sure they'll say it's fine, don't you think?": [
        *[57, 5248, 2090, 502, 3060, 1643, 357, 506, 4979, 28, 1326, 982, 346, 1510, 47],
    ],
    "Café naïve résumé façade Ångström": [
        *[51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 40852, 5549, 223, 863, 1321, 45682],
    ],
    "你好，世界！这是一个测试。": [
        *[18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219, 48287, 27830, 43340, 43222, 229],
        *[16313, 239, 19076],
    ],
    "Emoji: 😀👍🏽🇺🇸 and ❤️": [
        *[10809, 33777, 42, 40303, 218, 10813, 235, 231, 10813, 233, 138, 10813, 225, 135, 10813, 225, 133, 284],
        *[4636, 247, 114, 31752],
    ],
    "def foo(x):\n    return x ** 2  # square\n": [
        1604,
        29856,
        24,
        104,
        727,
        472,
        1003,
        1792,
        1903,
        216,
        34,
        216,
        907,
        5222,
        198,
    ],
    "<|im_start|>user\nHi<|im_end|>\n": [1, 4093, 198, 26843, 2, 198],
    "Numbers 12345 and 3.14159 and 1,000,000": [
        *[39006, 216, 33, 34, 35, 36, 37, 284, 216, 35, 30, 33, 36, 33, 37, 41, 284, 216, 33, 28, 32, 32, 32, 28],
        *[32, 32, 32],
    ],
    "Россия и Україна": [155, 250, 6485, 9382, 9382, 37187, 29972, 5470, 113, 13760, 23728, 156, 241, 38759],
    "¡Hola! ¿Qué tal?": [141, 111, 56, 7866, 17, 3351, 140, 6317, 2756, 5252, 47],
    "abc123def": [25276, 33, 34, 35, 1604],
    "Ⅻ and ½ and ٣": [173, 223, 121, 284, 216, 16738, 284, 216, 164, 113],
    "  \t x": [256, 197, 1792],
    "\u3000full width space": [12109, 218, 11069, 8068, 1898],
    "a  \n  b": [81, 256, 3805, 278],
    "1st 2nd 3rd 2024-01-31": [33, 302, 216, 34, 268, 216, 35, 7212, 216, 34, 32, 34, 36, 29, 32, 33, 29, 35, 33],
}


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.mark.real_model
@pytest.mark.parametrize("text", list(GOLDEN))
def test_real_golden_ids_and_round_trip(smol: Tokenizer, text: str) -> None:
    assert smol.encode(text) == GOLDEN[text]
    assert smol.decode(GOLDEN[text]) == text


@pytest.mark.real_model
def test_real_special_tokens(smol: Tokenizer) -> None:
    assert (smol.vocab_size, smol.bos_token_id, smol.eos_token_id) == (49152, 1, 2)
    assert smol.stop_token_ids == (2,)  # SmolLM2's EOS is <|im_end|> itself
    for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"]):
        assert smol.encode(token) == [[0, 1, 2, 3, 16][i]]
    assert smol.encode("x<|im_end|>y") == [104, 2, 105]
    assert smol.decode([1, 4093, 198, 26843, 2], skip_special_tokens=True) == "user\nHi"


@pytest.mark.real_model
def test_real_chat_template(smol: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert smol.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smol.apply_chat_template(messages[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
    )
    ids = smol.encode(smol.apply_chat_template(messages))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


@pytest.mark.real_model
def test_real_incremental_decoder(smol: Tokenizer) -> None:
    text = "Emoji: 😀👍🏽🇺🇸 and ❤️ — 你好，世界！ naïve"
    ids = smol.encode(text)
    pieces = [smol.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some characters really are split across tokens
    deltas = stream_decode(smol, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
