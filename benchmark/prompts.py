"""The prompt set: JSONL reading, and the token ids each prompt is sent as."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from tandem.formats.tokenizer import chat_prompt_ids


@dataclasses.dataclass(frozen=True)
class BenchPrompt:
    """One prompt of the set: its text and category (for the report) and the token ids that are sent."""

    text: str
    category: str
    ids: tuple[int, ...]


def read_prompts(path: str | os.PathLike[str], limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, category) pairs from a JSONL file of {"prompt": str, "category": str (optional)} objects.

    Raises:
        ValueError: a line is not such an object, or the file holds no prompt.
    """
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(f"{path}:{n}: expected a JSON object with a non-empty string 'prompt'")
            rows.append((row["prompt"], str(row.get("category", ""))))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows[:limit] if limit is not None else rows


def tokenize_prompts(rows: Sequence[tuple[str, str]], tokenizer: Any) -> list[BenchPrompt]:
    """Each prompt as a user message in the chat template (as `tandem generate --chat` renders it), tokenized."""
    return [BenchPrompt(text, category, tuple(chat_prompt_ids(tokenizer, text))) for text, category in rows]
