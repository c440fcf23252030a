"""The import rules of pyproject.toml's [tool.importlinter] hold, and they are not vacuous: a copy of the sources with
one deliberately wrong import breaks the contract that forbids it (and the same copy without it passes)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c["name"] for c in CONFIG["contracts"]}

# (file to edit, the import added to it, the contracts it breaks: ids of [[tool.importlinter.contracts]])
WRONG_IMPORTS = [
    ("tandem/model/layers.py", "import tandemrpc.convert", {"layers"}),  # the model layer reaching up to the wire
    ("tandem/formats/text.py", "import tandem.decoding.rounds", {"layers"}),  # the base reaching up to decoding
    ("loadtest/metrics.py", "import apps.cli.main", {"layers"}),  # the load test and the command line in a cycle
    # The services' layer is an independent one ("a | b | c"), so the layers contract objects too.
    ("primary_svc/servicer.py", "import secondary_svc.servicer", {"layers", "services-independent"}),
    ("tandem/decoding/costs.py", "import grpc", {"library-light"}),
    ("orchestrator/admission.py", "import tandem.model.kvcache", {"no-jax-in-orchestrator"}),  # JAX via the library
]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the project's contracts, on the packages found first on sys.path from `cwd`."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    )
    return subprocess.run(
        [*cmd, "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )


def broken(report: str) -> set[str]:
    """The ids of the contracts the report calls BROKEN (it wraps long contract names at 80 columns)."""

    def flat(text: str) -> str:
        return re.sub(r"\s+", " ", text)

    return {cid for cid, name in CONTRACTS.items() if flat(f"{name} BROKEN") in flat(report)}


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """The Python sources of every package the contracts name, and the contracts, copied into a scratch tree."""
    for package in CONFIG["root_packages"]:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (tmp_path / ".importlinter").write_text(_ini(CONFIG))
    return tmp_path


def _ini(config: dict) -> str:
    """pyproject.toml's [tool.importlinter] as the equivalent .importlinter INI file (the scratch tree has no
    pyproject.toml, which would make it an installable project)."""

    def value(v: object) -> str:
        return "\n    " + "\n    ".join(v) if isinstance(v, list) else str(v)

    lines = ["[importlinter]"]
    lines += [f"{k} = {value(v)}" for k, v in config.items() if k != "contracts"]
    for c in config["contracts"]:
        lines.append(f"\n[importlinter:contract:{c['id']}]")
        lines += [f"{k} = {value(v)}" for k, v in c.items() if k != "id"]
    return "\n".join(lines) + "\n"


def test_the_project_keeps_every_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in done.stdout


def test_the_copy_keeps_every_contract_too(sources: Path) -> None:
    """The control for the next test: the scratch copy, unchanged, passes."""
    done = lint_imports(sources)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(("path", "statement", "contracts"), WRONG_IMPORTS)
def test_a_wrong_import_breaks_its_contract(sources: Path, path: str, statement: str, contracts: set[str]) -> None:
    target = sources / path
    target.write_text(target.read_text() + f"\n{statement}  # deliberately wrong\n")
    done = lint_imports(sources)
    assert done.returncode != 0, done.stdout
    assert broken(done.stdout) == contracts, done.stdout
    assert path.removesuffix(".py").replace("/", ".") in done.stdout  # the report names the importing module
