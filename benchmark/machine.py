"""The machine a run measured: CPU, cores, RAM, versions, whether the int8 kernel runs, the git commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[1]  # benchmark/machine.py -> the repository


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(REPO_DIR), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _int8_kernel() -> bool:
    """Whether a primary loaded on this machine, with this environment, runs its products in `tandem.model.kernels`."""
    from tandem.model import kernels

    return kernels.available()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, Python, JAX, whether the int8 kernel runs, and the date and git commit of this run."""
    mem = _proc_field("/proc/meminfo", "MemTotal")  # "131072000 kB"
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    # dirty: tracked code or docs changed; results/ is left out, since rerunning a documented command rewrites its file
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "grpcio": _version("grpcio"),
        "int8_kernel": _int8_kernel(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
    }
