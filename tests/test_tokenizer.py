"""Tokenizer: GGUF and HF loading, special tokens, chat template, streaming decode; goldens for the real SmolLM2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest

from tandem.formats.assets import smollm2_gguf_path
from tandem.formats.tokenizer import IncrementalDecoder, Tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes keep their character, the rest get
    code points 256, 257, ... in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer_gguf(path: Path, pre: str = "smollm", template: str | None = CHATML) -> None:
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, and a few merges."""
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "l l", "Ġ w"]
    tokens = SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny(tmp_path: Path) -> Tokenizer:
    write_tiny_tokenizer_gguf(tmp_path / "tok.gguf")
    return Tokenizer.from_gguf(tmp_path / "tok.gguf")


# --------------------------------------------------------------------------------------- tiny vocabulary


def test_tiny_gguf_vocabulary(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == 3 + 256 + 6
    assert (tiny.bos_token_id, tiny.eos_token_id) == (1, 0)
    assert tiny.stop_token_ids == (0, 2)  # EOS, then <|im_end|>
    the = tiny.token_to_id("Ġthe")
    assert tiny.encode(" the") == [the]
    assert tiny.encode("<|im_start|>the<|im_end|>") == [1, tiny.token_to_id("t"), tiny.token_to_id("he"), 2]
    assert tiny.encode("hi", add_bos=True)[0] == 1 and tiny.encode("hi")[0] != 1
    assert tiny.decode(tiny.encode("<|im_start|>x"), skip_special_tokens=True) == "x"


def test_smollm_pre_tokenizer_splits_digits(tmp_path: Path, tiny: Tokenizer) -> None:
    """The "12" merge exists, but llama.cpp's smollm pre-tokenizer isolates every digit first; plain GPT-2 does not."""
    write_tiny_tokenizer_gguf(tmp_path / "gpt2.gguf", pre="gpt-2")
    gpt2 = Tokenizer.from_gguf(tmp_path / "gpt2.gguf")
    assert tiny.encode("12") == [tiny.token_to_id("1"), tiny.token_to_id("2")]
    assert gpt2.encode("12") == [gpt2.token_to_id("12")]
    write_tiny_tokenizer_gguf(tmp_path / "odd.gguf", pre="some-new-model")
    with pytest.raises(ValueError, match="pre"):
        Tokenizer.from_gguf(tmp_path / "odd.gguf")


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "  two  spaces\t\ttabs\n\nnewlines\r\n",
        "naïve café ☕ 日本語 😀👍🏽",
        "x = [1, 22, 333]  # ok",
        "",
    ],
)
def test_tiny_round_trip(tiny: Tokenizer, text: str) -> None:
    assert tiny.decode(tiny.encode(text)) == text


def test_chat_template_tiny(tiny: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tiny.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert tiny.apply_chat_template(messages[:1]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_errors(tmp_path: Path) -> None:
    write_tiny_tokenizer_gguf(tmp_path / "none.gguf", template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf(tmp_path / "none.gguf").apply_chat_template([{"role": "user", "content": "x"}])
    write_tiny_tokenizer_gguf(tmp_path / "raise.gguf", template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        Tokenizer.from_gguf(tmp_path / "raise.gguf").apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_is_sandboxed(tmp_path: Path) -> None:
    write_tiny_tokenizer_gguf(tmp_path / "evil.gguf", template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match=r"unsafe|access"):
        Tokenizer.from_gguf(tmp_path / "evil.gguf").apply_chat_template([])


def test_from_hf_dir_matches_from_gguf(tmp_path: Path, tiny: Tokenizer) -> None:
    tiny.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}, "chat_template": CHATML}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.vocab_size) == (1, 0, tiny.vocab_size)
    text = "<|im_start|>the 12 naïve<|im_end|>"
    assert hf.encode(text) == tiny.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages) == tiny.apply_chat_template(messages)


# ------------------------------------------------------------------------------------- streaming decode


def _stream(tok: Tokenizer, ids: list[int], **kw: bool) -> list[str]:
    dec = IncrementalDecoder(tok, **kw)
    deltas = [dec.push(i) for i in ids]
    return [*deltas, dec.flush()]


def test_incremental_decoder_holds_back_split_characters(tiny: Tokenizer) -> None:
    text = "aé 日本 😀👍🏽 z"
    ids = tiny.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: every multi-byte character is split
    deltas = _stream(tiny, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= len(text.encode("utf-8")) - len(text)  # held back while a character was open
    assert deltas[:3] == ["a", "", "é"]


def test_incremental_decoder_random_chunks(tiny: Tokenizer) -> None:
    """Speculative rounds deliver several tokens at once; any chunking gives the same text, never a broken char."""
    text = "Grüße, 世界! 👍🏽 ok ☕☕ end"
    ids = tiny.encode(text)
    rng = random.Random(0)
    for _ in range(20):
        dec, deltas, i = tiny.incremental_decoder(), [], 0
        while i < len(ids):
            n = rng.randint(1, 6)
            deltas.append(dec.push(ids[i : i + n]))
            i += n
        deltas.append(dec.flush())
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_batches_and_specials(tiny: Tokenizer) -> None:
    ids = tiny.encode("<|im_start|>the ☕<|im_end|>")
    dec = tiny.incremental_decoder()
    assert dec.push(ids[:4]) + dec.push(ids[4:]) + dec.flush() == tiny.decode(ids)
    skipped = _stream(tiny, ids, skip_special_tokens=True)
    assert "".join(skipped) == "the ☕"


def test_incremental_decoder_flushes_a_dangling_byte(tiny: Tokenizer) -> None:
    ids = tiny.encode("ok😀")[:-1]  # drop the emoji's last byte
    dec = tiny.incremental_decoder()
    assert dec.push(ids) == "ok"
    assert dec.flush() == "\ufffd"
    assert dec.flush() == ""


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
    deltas = _stream(smol, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
