"""The three services as one local stack of OS processes (what `tandem serve`, `tandem demo` and the end-to-end
tests run).

    with ServeStack(max_len=512, slots=2) as stack:   # starts primary, secondary and orchestrator, waits for SERVING
        with TandemClient(stack.orchestrator_address) as client:
            ...

Each service is `python -m <package>` on 127.0.0.1 with its own ports and its own log file; nothing here imports JAX
(the children do). This module speaks gRPC (health checks), like the command line it serves and unlike the library.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandemrpc.process import PARENT_ENV

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SERVICES = ("primary", "secondary", "orchestrator")
MODULES = {"primary": "primary_svc", "secondary": "secondary_svc", "orchestrator": "orchestrator"}
_STOP_TIERS = (("orchestrator",), ("primary", "secondary"))  # the public front first, so no request loses a backend


class ServeError(RuntimeError):
    """A service of the stack failed to start, or exited while serving."""


def free_ports(n: int, host: str = HOST) -> list[int]:
    """`n` distinct ports that were free a moment ago (bound to port 0 together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def check_port_free(port: int, host: str = HOST) -> None:
    """Raises ServeError if something listens on host:port.

    gRPC servers bind with SO_REUSEPORT, so a second server on a busy port would silently share it with the first
    (and split its traffic); a plain bind here refuses instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine, listeners are not
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot use {host}:{port}: {e.strerror or e}") from None


def health_status(address: str, timeout_s: float = 1.0) -> int | None:
    """The grpc.health.v1 status of a server's overall health (None: no answer).

    A fresh channel per call: a reused one would sit in reconnect backoff (up to minutes) after the refused
    connections of a server that is still loading.
    """
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
        return int(resp.status)


def log_tail(path: Path, lines: int = 25, max_bytes: int = 16_384) -> str:
    """The last lines of a log file ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class ServeStack:
    """Primary, Secondary and Orchestrator as child processes on 127.0.0.1: start() / stop() / with-block.

    Args:
        port: the orchestrator's port (None or 0: a free one); the other ports are always free ones.
        slots: concurrent sessions of each model service.
        max_len: positions per session (all three services get the same).
        log_dir: where `<service>.log` go (None: a new temporary directory, kept after stop for inspection).
        gguf_path: the primary GGUF for all three (None: the services' default, SmolLM2; fetched here first so the
            children do not race to download it).
        startup_timeout_s: how long start() waits for all three to report SERVING (first start compiles and loads).
        stop_grace_s: how long stop() waits after SIGTERM before SIGKILL, per tier (orchestrator, then the models).
        die_with_parent: on Linux, children get SIGTERM if this process dies without stopping them.
        extra_args: more flags per service name, e.g. {"orchestrator": ["--max-tokens-limit", "4096"]}.
        warm: the model services compile every shape their configuration reaches before reporting SERVING
            (`--compile-at-start`), so no request waits for a compile; False starts them cold (faster, for tests).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        slots: int = 4,
        max_len: int = 2048,
        log_dir: str | os.PathLike[str] | None = None,
        gguf_path: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 600.0,
        stop_grace_s: float = 10.0,
        die_with_parent: bool = True,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        warm: bool = True,
    ) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError(f"slots and max_len must be >= 1, got {slots} and {max_len}")
        if port is not None and not 0 <= port < 65536:
            raise ValueError(f"port must lie in [0, 65535], got {port}")
        self.requested_port = port
        self.slots, self.max_len = slots, max_len
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="tandem-serve-"))
        self.gguf_path = Path(gguf_path) if gguf_path is not None else None
        self.startup_timeout_s, self.stop_grace_s = startup_timeout_s, stop_grace_s
        self.die_with_parent = die_with_parent
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.warm = warm
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._state_files: list[Path] = []

    # -- addresses -------------------------------------------------------------------------------------------

    @property
    def addresses(self) -> dict[str, str]:
        return {name: f"{HOST}:{port}" for name, port in self.ports.items()}

    @property
    def orchestrator_address(self) -> str:
        return self.addresses["orchestrator"]

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    @property
    def metrics_urls(self) -> dict[str, str]:
        return {name: f"http://{HOST}:{port}/metrics" for name, port in self.metrics_ports.items()}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def state(self) -> dict[str, Any]:
        """{"orchestrator": addr, "primary": addr, "secondary": addr, "pids": {...}, "metrics": {...}}."""
        addresses = self.addresses
        return {
            **{name: addresses[name] for name in ("orchestrator", "primary", "secondary")},
            "pids": {name: self.pids[name] for name in ("orchestrator", "primary", "secondary")},
            "metrics": {name: self.metrics_urls[name] for name in ("orchestrator", "primary", "secondary")},
        }

    def write_state(self, path: str | os.PathLike[str]) -> Path:
        """Writes state() as JSON (atomically); stop() removes the file again if it still describes this stack."""
        if not self.processes:
            raise ServeError("the stack is not started")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self._state_files.append(path)
        return path

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, on_ready: Callable[[str, float], object] | None = None) -> ServeStack:
        """launch() then wait_ready(); on any failure (or Ctrl-C) the children are stopped before raising."""
        self.launch()
        try:
            self.wait_ready(on_ready=on_ready)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Starts the three processes without waiting for them (see wait_ready)."""
        if self.processes:
            raise ServeError("the stack is already started")
        if self.requested_port:
            check_port_free(self.requested_port)
        if self.gguf_path is None and not os.environ.get("TANDEM_GGUF"):
            from tandem.formats.assets import smollm2_gguf_path  # no JAX; a no-op once cached

            smollm2_gguf_path()
        ports = free_ports(6)
        self.ports = {"primary": ports[0], "secondary": ports[1], "orchestrator": self.requested_port or ports[2]}
        self.metrics_ports = dict(zip(SERVICES, ports[3:], strict=True))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines reach the files as they happen
        env.pop(PARENT_ENV, None)
        if self.die_with_parent:
            env[PARENT_ENV] = str(os.getpid())  # each service calls die_with_parent() first
        try:
            for name in SERVICES:
                with open(self.log_path(name), "wb") as logf:
                    self.processes[name] = subprocess.Popen(
                        self.command(name),
                        stdin=subprocess.DEVNULL,
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,  # a terminal's Ctrl-C reaches only us; stop() shuts them down in order
                    )
                log.info("started %s (pid %d), log %s", name, self.processes[name].pid, self.log_path(name))
        except BaseException:
            self.stop()
            raise

    def command(self, name: str) -> list[str]:
        """The argv that starts service `name`."""
        args = [sys.executable, "-m", MODULES[name], "--host", HOST, "--port", str(self.ports[name])]
        args += ["--metrics-port", str(self.metrics_ports[name]), "--max-len", str(self.max_len)]
        if name == "orchestrator":
            args += ["--primary", self.addresses["primary"], "--secondary", self.addresses["secondary"]]
            args += ["--max-running", str(self.slots)]  # admission matches the sessions the model services hold
        else:
            args += ["--slots", str(self.slots)] + (["--compile-at-start"] if self.warm else [])
        if self.gguf_path is not None:
            args += ["--gguf", str(self.gguf_path)]
        return args + self.extra_args.get(name, [])

    def wait_ready(
        self,
        timeout_s: float | None = None,
        poll_s: float = 0.25,
        on_ready: Callable[[str, float], object] | None = None,
    ) -> None:
        """Polls grpc.health.v1 until all three are SERVING; on_ready(name, seconds) as each one gets there.

        Raises:
            ServeError: a process exited (with the tail of its log), or the deadline passed.
        """
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        waiting = [name for name in SERVICES if name in self.processes]
        while waiting:
            self.check_alive()
            for name in list(waiting):
                if health_status(self.addresses[name]) == health_pb2.HealthCheckResponse.SERVING:
                    waiting.remove(name)
                    log.info("%s serving on %s", name, self.addresses[name])
                    if on_ready is not None:
                        on_ready(name, time.monotonic() - start)
            if not waiting:
                break
            if time.monotonic() - start > timeout_s:
                raise ServeError(
                    f"{', '.join(waiting)} not serving after {timeout_s:.0f}s; logs in {self.log_dir}"
                    + "".join(
                        f"\n--- {self.log_path(n)} (last lines) ---\n{log_tail(self.log_path(n))}" for n in waiting
                    )
                )
            time.sleep(poll_s)

    def check_alive(self) -> None:
        """Raises ServeError naming the first child that has exited, with the tail of its log."""
        for name, p in self.processes.items():
            rc = p.poll()
            if rc is not None:
                path = self.log_path(name)
                raise ServeError(f"{name} exited with code {rc}; last lines of {path}:\n{log_tail(path)}")

    def wait(self, poll_s: float = 0.5) -> NoReturn:
        """Blocks while all three run; raises ServeError when one exits. Interrupt it with KeyboardInterrupt."""
        while True:
            self.check_alive()
            time.sleep(poll_s)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the orchestrator, then the model services; SIGKILL whatever outlives the grace period.

        A KeyboardInterrupt while waiting (a second Ctrl-C) kills the rest at once, then propagates.
        """
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        try:
            for tier in _STOP_TIERS:
                procs = [self.processes[n] for n in tier if n in self.processes]
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                for p in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(max(0.0, deadline - time.monotonic()))
        finally:
            for p in self.processes.values():
                if p.poll() is None:
                    p.kill()
                    log.warning("killed pid %d after %.0fs", p.pid, grace_s)
            for p in self.processes.values():
                p.wait()
            self._remove_state_files()

    def _remove_state_files(self) -> None:
        if not self._state_files:
            return
        mine = self.state()
        for path in self._state_files:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text(encoding="utf-8")) == mine:  # not one a later stack wrote over
                    path.unlink()
        self._state_files.clear()

    @property
    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def __enter__(self) -> ServeStack:
        if not self.processes:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def interrupt_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, these signals raise KeyboardInterrupt (main thread only).

    SIGINT too: a shell starts background jobs with SIGINT ignored, and `tandem serve &` should still stop on it.
    """
    old = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
