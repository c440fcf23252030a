"""The checked-in stubs match the .proto, and the import rules hold when run (pyproject.toml's import-linter
contracts state them statically; docs/design.md, Method)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def test_stubs_are_regenerated_from_the_proto(tmp_path: Path) -> None:
    """Same command as `make protos`, into a temporary directory, then a byte-for-byte diff."""
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "protos/tandemrpc/v1/tandem.proto"),
        ]
    )
    assert rc == 0
    for name in GENERATED:
        fresh = (tmp_path / "tandemrpc/v1" / name).read_text()
        assert fresh == (ROOT / "tandemrpc/v1" / name).read_text(), f"{name} is stale: run `make protos`"


def _imported_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_orchestrator_and_client_need_no_jax() -> None:
    loaded = _imported_modules(
        "import orchestrator.server, tandemrpc.client, tandem.formats.tokenizer, tandem.decoding.rounds"
    )
    assert "jax" not in loaded and "flax" not in loaded


def test_core_library_imports_no_grpc() -> None:
    loaded = _imported_modules("import tandem.decoding.engine, tandem.decoding.bundle, tandem.decoding.workers")
    assert "grpc" not in loaded and not {"primary_svc", "secondary_svc", "orchestrator"} & loaded


def test_model_services_do_not_import_each_other() -> None:
    assert "secondary_svc" not in _imported_modules("import primary_svc.server")
    assert "primary_svc" not in _imported_modules("import secondary_svc.server")
