"""The primary's states, recorded once, so a drafter trains without running the primary again.

A drafter that reads the primary's representations needs, for every training position, the primary's tapped states
there. Computing them inside every training step costs a full primary forward per batch; recording them once over a
self-distilled corpus (`tandem distill-data`: chat-templated prompts with the primary's own greedy answers) costs one
prefill pass over the data and turns training into a pass over the drafter alone.

Layout of a states directory:
    states.f16       float16 [N, n_taps, P]: row t holds the tapped residual streams at token t of the corpus file
    progress.json    {"tokens": rows written, "taps": [...], "source": corpus file, "examples": examples done}

Rows follow the corpus file token for token, so a window of tokens [s, s + T) has its states at rows [s, s + T).
Each example (one chat: system, user, assistant turns) is prefilled on its own (a fresh cache row), exactly as the
primary sees it when serving that chat; recording is resumable example by example.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.training.corpus import TOKEN_DTYPE

STATES_NAME = "states.f16"
PROGRESS_NAME = "progress.json"
STATE_DTYPE = np.dtype("<f2")

# Every chat-templated example begins "<|im_start|>system" in SmolLM2's vocabulary (ids 1, 9690): the boundary
# between examples of a self-distilled corpus, which stores them back to back.
EXAMPLE_START = (1, 9690)
# "<|im_start|>assistant\n": the answer follows it.
ANSWER_START = (1, 520, 9531, 198)


def example_bounds(tokens: np.ndarray, start: Sequence[int] = EXAMPLE_START) -> list[tuple[int, int]]:
    """[(begin, end)] of the chat examples stored back to back in `tokens` (each begins with `start`).

    Tokens before the first `start` are not an example and are left out.
    """
    a, b = start
    begins = np.flatnonzero((tokens[:-1] == a) & (tokens[1:] == b)).tolist()
    ends = [*begins[1:], int(tokens.shape[0])]
    return list(zip(begins, ends, strict=True))


def answer_offset(example: np.ndarray, marker: Sequence[int] = ANSWER_START) -> int:
    """Index of the first answer token of one example (after its last assistant header); len(example) if none."""
    m = len(marker)
    hits = [i + m for i in range(len(example) - m + 1) if tuple(example[i : i + m].tolist()) == tuple(marker)]
    return hits[-1] if hits else len(example)


def answer_mask(tokens: np.ndarray) -> np.ndarray:
    """[N] bool: True at the answer tokens of every example (what the primary wrote itself)."""
    mask = np.zeros(tokens.shape[0], bool)
    for begin, end in example_bounds(tokens):
        mask[begin + answer_offset(tokens[begin:end]) : end] = True
    return mask


def _batches(bounds: Sequence[tuple[int, int]], rows: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(bounds), rows):
        yield list(bounds[i : i + rows])


def record(
    corpus_file: Path,
    out_dir: Path,
    runner: Any,
    *,
    max_minutes: float | None = None,
    log_every: int = 50,
) -> dict[str, Any]:
    """Records (or resumes recording) the primary's tapped states for every example of `corpus_file`.

    Args:
        corpus_file: a uint16 token file of chat examples stored back to back (a self-distilled corpus split).
        out_dir: the states directory (see the module docstring).
        runner: a `PrimaryRunner` tapping the layers to record, with at least one slot and a context that holds the
            longest example.
        max_minutes: stop after this long (at an example boundary); run again to continue.

    Returns:
        The progress record.
    """
    tokens = np.fromfile(corpus_file, dtype=TOKEN_DTYPE)
    bounds = example_bounds(tokens)
    if bounds and bounds[0][0] != 0:
        raise ValueError(f"{corpus_file} does not begin with a chat example")
    taps = list(runner.taps)
    width = runner.cfg.d_model
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_path = out_dir / PROGRESS_NAME
    progress = (
        json.loads(progress_path.read_text())
        if progress_path.exists()
        else {"tokens": 0, "examples": 0, "taps": taps, "width": width, "source": str(corpus_file)}
    )
    if progress["taps"] != taps:
        raise ValueError(f"{out_dir} holds taps {progress['taps']}, the runner taps {taps}")
    path = out_dir / STATES_NAME
    row_bytes = len(taps) * width * STATE_DTYPE.itemsize
    with path.open("ab") as f:
        f.truncate(progress["tokens"] * row_bytes)  # drop a partly written batch of an interrupted run
    start, done = time.monotonic(), progress["examples"]
    todo = bounds[done:]
    for batch in _batches(todo, runner.batch):
        sizes = [end - begin for begin, end in batch]
        if max(sizes) > runner.max_len:
            raise ValueError(f"an example of {max(sizes)} tokens does not fit the runner's {runner.max_len}")
        block = np.zeros((len(batch), max(sizes)), np.int32)
        for b, (begin, end) in enumerate(batch):
            block[b, : sizes[b]] = tokens[begin:end]
        rows = list(range(len(batch)))
        for row in rows:
            runner.truncate(row, 0)
        hidden = runner.forward(block, rows=rows, sizes=sizes).hidden  # [B, T, n_taps, P]
        with path.open("ab") as f:
            for b in rows:
                f.write(np.ascontiguousarray(hidden[b, : sizes[b]], dtype=STATE_DTYPE).tobytes())
        done += len(batch)
        progress.update(tokens=batch[-1][1], examples=done)
        progress_path.write_text(json.dumps(progress) + "\n")
        if log_every and (done // len(batch)) % log_every == 0:
            rate = (batch[-1][1] - todo[0][0]) / max(time.monotonic() - start, 1e-9)
            print(f"states: {done}/{len(bounds)} examples, {batch[-1][1]} tokens ({rate:.0f} tokens/s)", flush=True)
        if max_minutes is not None and (time.monotonic() - start) / 60 >= max_minutes:
            break
    return progress


def open_states(out_dir: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(states [N, n_taps, P] as a read-only memory map, progress record) of a states directory."""
    progress = json.loads((out_dir / PROGRESS_NAME).read_text())
    shape = (progress["tokens"], len(progress["taps"]), progress["width"])
    return np.memmap(out_dir / STATES_NAME, dtype=STATE_DTYPE, mode="r", shape=shape), progress
