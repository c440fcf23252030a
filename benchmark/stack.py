"""The three services started here for a run through gRPC (`tandemrpc.launch.ServeStack` on free ports)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from benchmark.report import log_stderr

if TYPE_CHECKING:
    from tandemrpc.launch import ServeStack


def launch_stack(
    *,
    slots: int,
    max_len: int,
    startup_timeout_s: float = 600.0,
    prefix_cache_rows: int | None = None,
    log: Callable[[str], None] = log_stderr,
) -> ServeStack:
    """A ServeStack on free ports, launched but not yet serving (see `wait_serving`); the caller stop()s it.

    Launching first lets the caller do its own start-up (load a bundle, start Ray) while the services load.
    `prefix_cache_rows` sets the Primary's `--prefix-cache-rows` (None: its default).
    """
    from tandemrpc.launch import ServeStack

    # The bench compares the modes themselves: its orchestrator always speculates when asked (orchestrator/payoff.py).
    extra = {"orchestrator": ["--no-payoff"]}
    if prefix_cache_rows is not None:
        extra["primary"] = ["--prefix-cache-rows", str(prefix_cache_rows)]
    stack = ServeStack(port=0, slots=slots, max_len=max_len, startup_timeout_s=startup_timeout_s, extra_args=extra)
    log(f"starting primary, secondary and orchestrator (slots={slots}, max_len={max_len}); logs in {stack.log_dir}")
    stack.launch()
    return stack


def wait_serving(stack: ServeStack, log: Callable[[str], None] = log_stderr) -> str:
    """Waits until a stack from `launch_stack` serves; returns the orchestrator's address.

    Raises:
        tandemrpc.launch.ServeError: a service exited or did not serve within the stack's startup timeout.
    """
    stack.wait_ready(on_ready=lambda name, s: log(f"{name} serving after {s:.1f}s"))
    return stack.orchestrator_address
