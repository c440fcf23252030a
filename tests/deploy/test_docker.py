"""The image's install path (docker/install.sh) is the one CI runs, and its TPU variant asks for the right JAX.

No Docker daemon here: the script's commands are checked with --dry-run, the Dockerfile by reading it. The real
install runs in every CI job (`make setup` calls the script).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "install.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="docker/install.sh is a bash script")


def dry_run(*args: str, cwd: Path = ROOT) -> list[list[str]]:
    """The commands install.sh would run, each split back into its arguments."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=cwd, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def jax_requirement() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (jax,) = [d for d in deps if re.match(r"jax\[", d)]
    return str(jax)


def test_dev_install_is_what_make_setup_runs(tmp_path: Path) -> None:
    cmds = dry_run("--dev", "venv-here", cwd=tmp_path)  # a relative VENV_DIR is the caller's, not the project's
    venv = tmp_path / "venv-here"
    assert cmds == [
        ["python3", "-m", "venv", str(venv)],
        [f"{venv}/bin/pip", "install", "-q", "--upgrade", "pip"],
        [f"{venv}/bin/pip", "install", "-q", "-e", ".[dev]"],
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(BIN\)/tandem:.*\n(\t.*\n)*\t.*docker/install\.sh --dev \$\(VENV\)", makefile, re.M)


def test_tpu_variant_installs_jax_tpu_with_the_projects_jax_range() -> None:
    requirement = jax_requirement()
    assert requirement.startswith("jax[cpu]")
    cmds = dry_run("--variant", "tpu", "--fetch-model", "/opt/venv")
    install = cmds[2]
    assert install[:4] == ["/opt/venv/bin/pip", "install", "-q", "."]  # a regular install for the image
    assert install[4:] == [requirement.replace("jax[cpu]", "jax[tpu]", 1)]
    assert cmds[3][:2] == ["/opt/venv/bin/python", "-c"] and "smollm2_gguf_path()" in cmds[3][2]
    cpu = dry_run("--variant", "cpu", "/opt/venv")
    assert cpu[2] == ["/opt/venv/bin/pip", "install", "-q", "."] and len(cpu) == 3
    built = dry_run("--variant", "cpu", "--build-kernel", "/opt/venv")
    assert built[3][:2] == ["/opt/venv/bin/python", "-c"] and "kernels.build_all()" in built[3][2]


@pytest.mark.parametrize("args", [["--variant", "gpu", "v"], ["--bogus", "v"], [], ["a", "b"]])
def test_install_script_refuses_bad_usage(args: list[str]) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""


def test_dockerfile_builds_both_variants_with_the_install_script() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)
    assert {"cpu", "tpu"} <= set(stages)
    assert stages[-1] == "cpu"  # a plain `docker build` gives the variant that runs anywhere
    for variant, flags in (("cpu", " --build-kernel"), ("tpu", "")):
        assert re.search(
            rf"^RUN bash docker/install\.sh --variant {variant} --fetch-model{flags} /opt/venv\b", text, re.M
        )
    # The CPU image ships the int8 kernel prebuilt where the runtime looks for it (it has no compiler).
    assert len(re.findall(r"TANDEM_KERNEL_CACHE=/opt/tandem/cache/kernels", text)) == 2
    # The image copies every package pyproject.toml installs (and the readme it declares).
    packages = ("tandem", "tandemrpc", "primary_svc", "secondary_svc", "orchestrator", "loadtest", "benchmark", "apps")
    for path in ("pyproject.toml", "README.md", "docker/install.sh", *packages):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} == set(packages)
