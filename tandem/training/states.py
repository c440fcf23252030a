"""The primary's states, recorded once, so a drafter trains without running the primary again.

A drafter that reads the primary's representations needs, for every training position, the primary's tapped states
there. `tandem distill-data --record-taps` keeps them while the primary writes its answers; `record` computes them for
a self-distilled corpus written without them (its token ids kept, its states not): one prefill pass per example.

Layout, beside a split's tokens `<split>.bin`:
    <split>.states.f16   float16 [N, n_taps, P]: row t holds the tapped residual streams at token t of the split
                         (the last token of each example is never fed while writing, so its row is zero)
    <split>.states.json  progress of `record`: {"tokens": rows written, "examples": examples done}
and `manifest.json`'s "states": {"taps", "width", "dtype", "file"} once a split's states are complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.training.corpus import TOKEN_DTYPE

STATES_SUFFIX = "states.f16"  # <split>.states.f16
STATE_DTYPE = np.dtype("<f2")

# Every chat-templated example begins "<|im_start|>system" in SmolLM2's vocabulary (ids 1, 9690): the boundary
# between examples of a self-distilled corpus, which stores them back to back.
EXAMPLE_START = (1, 9690)
# "<|im_start|>assistant\n": the answer follows it.
ANSWER_START = (1, 520, 9531, 198)


def states_entry(taps: Sequence[int], width: int) -> dict[str, Any]:
    """manifest.json's "states" entry for a split recorded at `taps`, `width` wide."""
    return {"taps": list(taps), "width": width, "dtype": "float16", "file": STATES_SUFFIX}


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
    directory: Path,
    runner: Any,
    split: str = "train",
    *,
    max_minutes: float | None = None,
    log_every: int = 50,
    example_start: Sequence[int] = EXAMPLE_START,
) -> dict[str, Any]:
    """Records (or resumes recording) the primary's tapped states for every example of a self-distilled split.

    Args:
        directory: a `tandem distill-data` directory (`<split>.bin` of chat examples stored back to back).
        runner: a `PrimaryRunner` tapping the layers to record, its context long enough for the longest example.
        split: "train" or "val".
        max_minutes: stop after this long (at an example boundary); run again to continue.
        example_start: the tokens every example begins with (SmolLM2's chat template by default).

    Returns:
        The progress record ({"tokens", "examples", "total_examples"}).
    """
    tokens = np.fromfile(directory / f"{split}.bin", dtype=TOKEN_DTYPE)
    bounds = example_bounds(tokens, example_start)
    if bounds and bounds[0][0] != 0:
        raise ValueError(f"{directory / f'{split}.bin'} does not begin with a chat example")
    taps, width = list(runner.taps), runner.cfg.d_model
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    recorded = manifest.get("states") or states_entry(taps, width)
    if recorded["taps"] != taps:
        raise ValueError(f"{directory} records taps {recorded['taps']}, the runner taps {taps}")
    progress_path = directory / f"{split}.states.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"tokens": 0, "examples": 0}
    path = directory / f"{split}.{STATES_SUFFIX}"
    with path.open("ab") as f:  # drop a partly written batch of an interrupted run
        f.truncate(progress["tokens"] * len(taps) * width * STATE_DTYPE.itemsize)
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
                states = np.array(hidden[b, : sizes[b]], dtype=STATE_DTYPE)
                states[-1] = 0  # as while writing: the example's last token is never fed
                f.write(states.tobytes())
        done += len(batch)
        progress.update(tokens=batch[-1][1], examples=done)
        progress_path.write_text(json.dumps(progress) + "\n")
        if log_every and (done // len(batch)) % log_every == 0:
            rate = (batch[-1][1] - todo[0][0]) / max(time.monotonic() - start, 1e-9)
            print(f"states: {done}/{len(bounds)} examples, {batch[-1][1]} tokens ({rate:.0f} tokens/s)", flush=True)
        if max_minutes is not None and (time.monotonic() - start) / 60 >= max_minutes:
            break
    if done == len(bounds):
        manifest["states"] = recorded
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return {**progress, "total_examples": len(bounds)}
