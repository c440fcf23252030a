"""The corpus built with the real SmolLM2 tokenizer keeps every training document and its token count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import split_docs

from tandem.formats.tokenizer import Tokenizer
from tandem.training import corpus

# ------------------------------------------------------------------------------------------- real tokenizer


@pytest.mark.real_model
def test_build_with_real_tokenizer(tmp_path: Path, sample_docs: dict[str, list[str]]) -> None:
    import gguf

    from tandem.formats.assets import smollm2_gguf_path

    real = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path()))
    m = corpus.build_corpus_from_texts(tmp_path, real, sample_docs, val_fraction=0.2)
    assert m["tokenizer"]["vocab_size"] == 49_152 and m["tokenizer"]["eos_token_id"] == real.eos_token_id
    train = np.asarray(corpus.load_split(tmp_path, "train"))
    docs = split_docs(train, real)
    for name, source in sample_docs.items():
        mask = corpus.validation_mask(name, len(source), 0.2, 0)
        kept = [d for d, v in zip(source, mask, strict=True) if not v]
        assert [d for d in docs if d in source] == kept
        assert m["sources"][name]["train_tokens"] == sum(len(real.encode(d)) + 1 for d in kept)
