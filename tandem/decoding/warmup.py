"""Warming a model service up: compiling every shape its configuration can reach before it reports SERVING, within the
process's memory-map limit, with a persistent compilation cache so a restart loads instead of compiling.

Each program XLA:CPU compiles holds its code in memory maps of its own, and a process may hold only
`vm.max_map_count` of them (65,530 by default, Kubernetes nodes included); past it LLVM fails with "Cannot allocate
memory" and the process dies. `compile_all` projects the count from the programs compiled so far and stops with a
`WarmupError` that names the limit and what would fit, instead of crashing mid-way.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import jax

from tandem.config import SamplingParams
from tandem.errors import WarmupError
from tandem.formats.assets import cache_root
from tandem.formats.tokenizer import Tokenizer, chat_prompt_ids

if TYPE_CHECKING:
    from tandem.decoding.workers import PrimaryWorker

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MAP_LIMIT_PATH = Path("/proc/sys/vm/max_map_count")
# The share of vm.max_map_count a warm-up may fill: the rest is for programs compiled on first use (the vanilla
# drafter's rounds, sampled rounds) and the process's own libraries.
WARMUP_MAP_SHARE = 0.5
# Shapes of at most this many padded tokens are also run once while warming up (cheap): a request's first call of a
# shape then finds jit's dispatch warm as well as the program compiled. Larger ones (long prefills) only compile.
RUN_UPTO_TOKENS = 256
# XLA's compile event: one per program a process obtains, compiled or loaded from the persistent cache.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def memory_maps() -> int | None:
    """This process's memory maps (lines of /proc/self/maps), or None where there is no such file."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def map_limit() -> int | None:
    """vm.max_map_count, or None where it cannot be read (not Linux)."""
    try:
        return int(MAP_LIMIT_PATH.read_text().strip())
    except (OSError, ValueError):
        return None


class _ProgramCounter:
    """Counts the programs this process obtains from XLA (compiled, or loaded from the persistent cache) from the
    import of this module on."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_secs: float, **_: object) -> None:
        if event == _COMPILE_EVENT:
            with self._lock:
                self.count += 1


_PROGRAMS = _ProgramCounter()


def compiled_programs() -> int:
    """Programs this process has obtained from XLA (a Prometheus gauge, monotonic: a rise while serving means a
    request waited for a compile)."""
    return _PROGRAMS.count


def enable_compilation_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Turns on JAX's persistent compilation cache for this process, in every program (not only those that took over
    a second, JAX's default).

    Args:
        directory: the cache (default: $JAX_COMPILATION_CACHE_DIR, else `xla/` in the asset cache).

    Returns:
        The cache directory.
    """
    path = Path(directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or cache_root() / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compile_all(
    shapes: Sequence[_T],
    compile_one: Callable[[_T], object],
    *,
    what: str,
    smaller: str,
    share: float = WARMUP_MAP_SHARE,
    progress_every_s: float = 10.0,
) -> int:
    """Compiles every shape in order, logging progress (shapes done / total), and stops before the process's memory
    maps would pass `share` of vm.max_map_count.

    After each shape the maps the rest would add are projected from the mean so far; a plan that would not fit raises
    WarmupError before it gets there (the first shapes are the smallest, so the mean overestimates, which errs safe).

    Args:
        shapes: what to compile, in order.
        compile_one: compiles one shape.
        what: the service, for the messages ("primary").
        smaller: the settings that shrink the plan, for the message ("--slots / --max-batch or --max-len").
        share: the share of vm.max_map_count the warm-up may fill.
        progress_every_s: log a progress line at most this often.

    Returns:
        How many shapes were compiled (or found compiled).

    Raises:
        WarmupError: the plan would not fit.
    """
    limit, start_maps = map_limit(), memory_maps()
    started = last_log = time.monotonic()
    for done, shape in enumerate(shapes, 1):
        compile_one(shape)
        now, maps = time.monotonic(), memory_maps()
        if limit is not None and maps is not None and start_maps is not None:
            projected = maps + (maps - start_maps) / done * (len(shapes) - done)
            if projected > share * limit:
                needed = math.ceil(projected / share)
                raise WarmupError(
                    f"{what}: warming up {len(shapes)} shapes would take ~{projected:,.0f} memory maps, more than "
                    f"{share:.0%} of vm.max_map_count ({limit:,}), the most one process may hold; lower {smaller}, "
                    f"or raise the limit to at least {needed:,} (sysctl -w vm.max_map_count={needed})"
                )
        if now - last_log >= progress_every_s or done == len(shapes):
            log.info(
                "%s warm-up: %d/%d shapes compiled in %.1f s (%s memory maps)",
                what,
                done,
                len(shapes),
                now - started,
                "?" if maps is None else f"{maps:,}",
            )
            last_log = now
    return len(shapes)


def chat_preamble(tokenizer: Tokenizer) -> list[int]:
    """The token ids every one-message chat starts with under the tokenizer's template (SmolLM2's: its default system
    message and the user turn's header); [] without a template."""
    if tokenizer.chat_template is None:
        return []
    a, b = chat_prompt_ids(tokenizer, "a"), chat_prompt_ids(tokenizer, "b")
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def warm_prefix(worker: PrimaryWorker, tokenizer: Tokenizer) -> int:
    """Prefills the chat preamble once through the worker (a serving start-up step), so its prefix cache holds it and
    the first chat requests reuse it as later ones would; returns its length (0: no template or no prefix cache)."""
    ids = chat_preamble(tokenizer)
    if not ids or worker.prefixes is None:
        return 0
    session = "tandem-warmup-preamble"
    worker.prefill(session, ids, SamplingParams(), want_hidden=False)
    worker.release(session)
    return len(ids)
