"""Helpers that tests of more than one tier share, imported by module name like `conftest` and `reference_numpy`
(tests/ is on sys.path: pytest puts the root conftest's folder there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tandem.formats.tokenizer import IncrementalDecoder, Tokenizer
from tandem.training import corpus

DATA = Path(__file__).parent / "data"
CORPUS_SAMPLE = DATA / "corpus_sample.txt"  # two public-domain texts, nine documents


def sample_documents() -> dict[str, list[str]]:
    """tests/data/corpus_sample.txt's documents as two sources."""
    docs = corpus.text_documents(CORPUS_SAMPLE)
    return {"moby": docs[:5], "sotu": docs[5:]}


def split_docs(ids: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a split back into its documents (the file must end with EOS)."""
    assert ids.size == 0 or ids[-1] == tok.eos_token_id
    cuts = np.flatnonzero(ids == tok.eos_token_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, cuts, strict=True)]


def stream_decode(tok: Tokenizer, ids: list[int], **kw: bool) -> list[str]:
    """Streams ids one at a time through an IncrementalDecoder: the deltas, then the final flush."""
    dec = IncrementalDecoder(tok, **kw)
    deltas = [dec.push(i) for i in ids]
    return [*deltas, dec.flush()]
