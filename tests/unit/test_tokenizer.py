"""Tokenizer: GGUF and HF loading, special tokens, chat template, streaming decode; goldens for the real SmolLM2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import pytest
from helpers import stream_decode

from tandem.formats.tokenizer import Tokenizer

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


def test_incremental_decoder_holds_back_split_characters(tiny: Tokenizer) -> None:
    text = "aé 日本 😀👍🏽 z"
    ids = tiny.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: every multi-byte character is split
    deltas = stream_decode(tiny, ids)
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
    skipped = stream_decode(tiny, ids, skip_special_tokens=True)
    assert "".join(skipped) == "the ☕"


def test_incremental_decoder_flushes_a_dangling_byte(tiny: Tokenizer) -> None:
    ids = tiny.encode("ok😀")[:-1]  # drop the emoji's last byte
    dec = tiny.incremental_decoder()
    assert dec.push(ids) == "ok"
    assert dec.flush() == "\ufffd"
    assert dec.flush() == ""
