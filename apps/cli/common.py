"""What the command modules share: the default address, flag parsing helpers, the one-line generation summary."""

from __future__ import annotations

from typing import Any

DEFAULT_PORT = 50050
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"


def split_csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def positive_int(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{flag} takes whole numbers >= 1, got {text!r}")
    return int(text)


def summary(s: dict[str, Any]) -> str:
    return (
        f"{s['output_tokens']} tokens in {s['elapsed_s']:.2f}s ({s['tokens_per_s']:.1f} tok/s), rounds={s['rounds']}, "
        f"accepted {s['accepted_tokens']}/{s['drafted_tokens']} drafts, declined rounds={s['declined_rounds']}"
        + (
            f", lookup rounds={s['lookup_rounds']} (accepted {s['lookup_accepted_tokens']}/"
            f"{s['lookup_drafted_tokens']})"
            if s.get("lookup_rounds")
            else ""
        )
    )
