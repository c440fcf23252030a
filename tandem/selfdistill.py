"""Self-distillation text: the primary's own greedy answers to instruction prompts.

Drafters agree best with what the primary itself writes (its chat answers have a style the registry corpus lacks), so
`tandem distill-data` has the frozen primary answer templated instructions and stores prompt + answer as a corpus
directory in `tandem corpus`'s format (uint16 train.bin / val.bin + manifest.json), which `tandem train --corpus`
reads. Prompts are built from the corpus's training documents (a sentence or a topic word put into an instruction
template) and from a list of small programming tasks; none comes from the benchmark's prompt set.

Generation is greedy and batched over the cache's slots (a finished row takes the next prompt at once), and
resumable: examples are appended batch by batch and `progress.json` records how many prompts are done.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.corpus import MANIFEST_NAME, TOKEN_DTYPE, fetch_texts, validation_mask
from tandem.primary import PrimaryRunner
from tandem.tokenizer import Tokenizer

_TEMPLATES = (
    "Explain this passage in simple words: {sentence}",
    "Write a short story that begins with: {sentence}",
    "Summarize the following text in two sentences: {sentence}",
    "What is the main idea of this sentence? {sentence}",
    "Rewrite this sentence in modern English: {sentence}",
    "Tell me three interesting facts about {topic}.",
    "What is {topic}? Answer briefly.",
    "Write a short poem about {topic}.",
    "Give me some advice about {topic}.",
    "Describe {topic} to a ten-year-old.",
    "Write a {language} function that {task}.",
    "How do I write a program in {language} that {task}? Show the code.",
)
_LANGUAGES = ("Python", "JavaScript", "Python", "C", "Java", "Rust", "Go")
_TASKS = (
    "reverses a list",
    "counts the words in a sentence",
    "finds the largest number in an array",
    "checks whether a word is a palindrome",
    "computes the factorial of a number",
    "sorts a list of names alphabetically",
    "converts Celsius to Fahrenheit",
    "removes duplicates from a list",
    "returns the nth Fibonacci number",
    "reads a text file and prints each line",
    "merges two sorted lists",
    "computes the average of a list of numbers",
    "counts how often each letter appears in a string",
    "checks whether a year is a leap year",
    "finds the greatest common divisor of two numbers",
    "capitalizes the first letter of every word",
    "sums the digits of an integer",
    "converts a binary string to an integer",
    "flattens a nested list",
    "validates an email address with a regular expression",
)
_SENTENCE = re.compile(r"[A-Z][^.!?\n]{40,200}[.!?]")
_TOPIC = re.compile(r"\b[A-Z][a-z]{4,14}\b")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How many answers to generate and how."""

    prompts: int = 2000  # instructions to answer
    max_new: int = 256  # most answer tokens per prompt
    slots: int = 16  # rows decoded together
    val_fraction: float = 0.02  # share of examples written to val.bin
    seed: int = 0


def instructions(docs: Sequence[str], n: int, seed: int) -> list[str]:
    """n instruction prompts from templates filled with sentences and topic words of `docs` and programming tasks."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        doc = docs[int(rng.integers(len(docs)))]
        start = int(rng.integers(max(1, len(doc) - 2000)))
        window = doc[start : start + 2000]
        sentences, topics = _SENTENCE.findall(window), _TOPIC.findall(window)
        if ("{sentence}" in template and not sentences) or ("{topic}" in template and not topics):
            continue
        out.append(
            template.format(
                sentence=" ".join(str(sentences[int(rng.integers(len(sentences)))]).split()) if sentences else "",
                topic=str(topics[int(rng.integers(len(topics)))]) if topics else "",
                language=_LANGUAGES[int(rng.integers(len(_LANGUAGES)))],
                task=_TASKS[int(rng.integers(len(_TASKS)))],
            )
        )
    return out


def greedy_answers(
    runner: PrimaryRunner, prompts: Sequence[Sequence[int]], max_new: int, stop_ids: Collection[int]
) -> Iterator[tuple[int, list[int]]]:
    """The primary's greedy answers, decoding every cache slot together; yields (prompt index, answer ids).

    An answer ends after a stop token (kept) or `max_new` tokens; its slot then takes the next prompt.
    """
    queue = iter(enumerate(prompts))
    active: dict[int, tuple[int, list[int]]] = {}  # slot -> (prompt index, answer so far)

    def fill(slot: int) -> None:
        nxt = next(queue, None)
        if nxt is None:
            return
        i, ids = nxt
        runner.truncate(slot, 0)
        out = runner.forward(np.asarray([ids]), rows=[slot])
        runner.commit(slot, len(ids))
        active[slot] = (i, [int(out.top[0, -1])])

    for slot in range(runner.batch):
        fill(slot)
    while active:
        for slot in [s for s, (_, ans) in active.items() if ans[-1] in stop_ids or len(ans) >= max_new]:
            i, ans = active.pop(slot)
            yield i, ans
            fill(slot)
        if not active:
            break
        rows = sorted(active)
        out = runner.forward(np.asarray([[active[s][1][-1]] for s in rows]), rows=rows)
        for b, slot in enumerate(rows):
            runner.commit(slot, 1)
            active[slot][1].append(int(out.top[b, 0]))


def build(
    out_dir: Path, runner: PrimaryRunner, tokenizer: Tokenizer, cfg: DistillConfig, *, max_minutes: float | None = None
) -> dict[str, Any]:
    """Generates (or resumes) the self-distillation corpus in out_dir; returns its progress record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_path = out_dir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"done": 0, "tokens": 0}
    if progress.get("config", dataclasses.asdict(cfg)) != dataclasses.asdict(cfg):
        raise ValueError(f"{out_dir} was started with other settings: {progress['config']}")
    docs = [d for texts in fetch_texts().values() for d in texts]
    prompts = instructions(docs, cfg.prompts, cfg.seed)
    chats = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    is_val = validation_mask("self-distill", cfg.prompts, cfg.val_fraction, cfg.seed)
    todo = list(range(progress["done"], cfg.prompts))
    start = time.monotonic()
    results: dict[int, list[int]] = {}
    for i, answer in greedy_answers(runner, [chats[j] for j in todo], cfg.max_new, tokenizer.stop_token_ids):
        results[todo[i]] = answer
        while progress["done"] in results:  # append in prompt order so a resumed run continues exactly
            j = progress["done"]
            example = np.asarray([*chats[j], *results.pop(j)], dtype=TOKEN_DTYPE)
            with (out_dir / ("val.bin" if is_val[j] else "train.bin")).open("ab") as f:
                f.write(example.tobytes())
            progress.update(done=j + 1, tokens=progress["tokens"] + int(example.size), config=dataclasses.asdict(cfg))
            progress_path.write_text(json.dumps(progress) + "\n")
        if max_minutes is not None and (time.monotonic() - start) / 60 >= max_minutes:
            break
    manifest = {
        "format": "self-distill",
        "dtype": "uint16 little-endian",
        "layout": "each example: the chat-templated prompt, then the primary's greedy answer (ending in EOS or cut)",
        "prompts_done": progress["done"],
        "tokens": progress["tokens"],
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return progress
