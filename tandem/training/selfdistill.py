"""Self-distillation text: the primary's own greedy answers to instruction prompts.

Drafters agree best with what the primary itself writes (its chat answers have a style the registry corpus lacks), so
`tandem distill-data` has the frozen primary answer templated instructions and stores prompt + answer as a corpus
directory in `tandem corpus`'s format (uint16 train.bin / val.bin + manifest.json), which `tandem train --corpus`
reads. Prompts are built from the corpus's training documents (a sentence or a topic word put into an instruction
template) and from a list of small programming tasks; none comes from the benchmark's prompt set.

Generation is greedy and batched over the cache's slots (a finished row takes the next prompt at once), and
resumable: examples are appended batch by batch and `progress.json` records how many prompts are done.

When the primary taps layers, the same passes record its tapped states: `train.states.f16` / `val.states.f16` hold
float16 [n_tokens, n_taps, P] rows aligned token for token with `train.bin` / `val.bin` (see
`tandem.training.states`), so training a drafter that reads them never runs the primary again.
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

from tandem.formats.tokenizer import Tokenizer
from tandem.model.primary import PrimaryRunner
from tandem.training.corpus import MANIFEST_NAME, TOKEN_DTYPE, fetch_texts, validation_mask
from tandem.training.states import STATE_DTYPE, STATES_SUFFIX, states_entry

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
    "Show me {language} code that {task}, with comments.",
    "Write a unit test in {language} for a function that {task}.",
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
    "finds all prime numbers below a limit",
    "transposes a matrix",
    "counts the vowels in a string",
    "checks whether two strings are anagrams",
    "finds the second largest number in a list",
    "converts a string to title case",
    "implements binary search on a sorted list",
    "implements a stack with push and pop",
    "implements a queue using two stacks",
    "reverses the words in a sentence",
    "computes the power of a number without using the built-in operator",
    "rotates a list by k positions",
    "finds the longest word in a sentence",
    "counts the lines in a file",
    "parses a CSV line into fields",
    "generates a random password",
    "computes the median of a list",
    "checks whether a number is prime",
    "converts a Roman numeral to an integer",
    "converts an integer to a Roman numeral",
    "finds the intersection of two lists",
    "groups words by their first letter",
    "computes the dot product of two vectors",
    "checks whether parentheses in a string are balanced",
    "sorts a list with bubble sort",
    "sorts a list with merge sort",
    "finds the minimum and maximum of a list in one pass",
    "removes the vowels from a string",
    "computes simple interest",
    "prints a multiplication table",
    "converts kilometers to miles",
    "finds the mode of a list",
    "chunks a list into pieces of size n",
    "computes the area of a circle",
    "counts the occurrences of a word in a text",
    "returns the list of divisors of a number",
    "reads a JSON file and prints its keys",
    "computes the running total of a list",
    "checks whether a list is sorted",
    "swaps the keys and values of a dictionary",
)
# Chat instructions in the styles users send (advice, stories, explanations, how-tos, lists, letters, code), built by
# crossing templates with hand-written subjects; `chat_instructions` draws from them. None is a benchmark prompt.
_SITUATIONS = (
    "I start a new job next week",
    "my roommate never does the dishes",
    "I failed an exam I studied hard for",
    "my sister is getting married and I have to give a speech",
    "I keep procrastinating on my thesis",
    "my best friend moved to another country",
    "I want to ask for a raise",
    "I feel lonely in the evenings",
    "my teenage son spends all day on his phone",
    "I have too many meetings at work",
    "I am afraid of flying",
    "my neighbour plays loud music late at night",
    "I want to learn to cook but I have no time",
    "I spend too much money on takeaway food",
    "my parents are getting older and need more help",
    "I have to give a presentation to my whole department",
    "I can't decide between two job offers",
    "I want to run a marathon next year",
    "my cat scratches the furniture",
    "I often forget people's names",
    "I want to change careers at forty",
    "my colleague takes credit for my work",
    "I have trouble sleeping",
    "I want to save money for a house",
    "my daughter is being bullied at school",
    "I feel stressed every Monday",
    "I moved to a country where I don't speak the language",
    "my partner and I argue about chores",
    "I was invited to a wedding where I know nobody",
    "I want to read more books",
    "my garden keeps dying",
    "I have a long train journey tomorrow",
    "I want to volunteer in my community",
    "I am starting university",
    "my old laptop is very slow",
    "I need to tell my boss I made a mistake",
    "I want to get fit without a gym",
    "my friend keeps cancelling our plans",
    "I am planning my first trip abroad",
    "I want to stop biting my nails",
)
_SUBJECTS = (
    "photosynthesis",
    "black holes",
    "the water cycle",
    "inflation",
    "vaccines",
    "the Roman Empire",
    "earthquakes",
    "how bees make honey",
    "the stock market",
    "climate change",
    "the internet",
    "electric cars",
    "volcanoes",
    "the human heart",
    "compound interest",
    "the French Revolution",
    "rainbows",
    "how airplanes fly",
    "DNA",
    "the Moon's phases",
    "recycling",
    "solar panels",
    "the immune system",
    "the printing press",
    "gravity",
    "machine learning",
    "the Great Wall of China",
    "tides",
    "how a refrigerator works",
    "democracy",
    "coral reefs",
    "the pyramids of Egypt",
    "sleep",
    "antibiotics",
    "the speed of light",
    "chess",
    "coffee",
    "the Olympic Games",
    "bread baking",
    "the seasons",
    "batteries",
    "whales",
    "the Renaissance",
    "cryptocurrency",
    "memory",
    "the periodic table",
    "hurricanes",
    "jazz music",
    "dinosaurs",
    "the metric system",
    "meditation",
    "glaciers",
)
_CHARACTERS = (
    "a lighthouse keeper",
    "a young dragon",
    "a retired astronaut",
    "a shy robot",
    "a clever fox",
    "a baker",
    "a lost kitten",
    "a time traveller",
    "a girl who can talk to trees",
    "an old fisherman",
    "a brave mouse",
    "a detective",
    "a musician",
    "a grandmother",
    "a wizard's apprentice",
    "a street artist",
    "a ship's cook",
    "a little cloud",
    "a forgetful king",
    "two best friends",
)
_PLACES = (
    "a small village in the mountains",
    "a space station",
    "a busy city market",
    "an island",
    "a haunted library",
    "the bottom of the sea",
    "a desert town",
    "a snowy forest",
    "a train at night",
    "a school on the Moon",
)
_THINGS = (
    "a garden",
    "a birthday party",
    "a job interview",
    "a camping trip",
    "a budget",
    "a home office",
    "a vegetable soup",
    "a study schedule",
    "a weekend in Paris",
    "a book club",
    "a small business",
    "a wedding toast",
    "a morning routine",
    "a picnic",
    "a science fair project",
    "a podcast",
    "a bike ride",
    "a family reunion",
)
_CHAT_TEMPLATES = (
    "{situation_cap}. Any advice?",
    "{situation_cap}. What should I do?",
    "{situation_cap} and I feel anxious about it. How can I cope?",
    "{situation_cap}. Can you give me a few practical tips?",
    "How can I stay positive when {situation}?",
    "Explain {subject} in simple terms.",
    "Can you explain {subject} to a child?",
    "Why is {subject} important?",
    "Give me three surprising facts about {subject}.",
    "What are the pros and cons of {subject}?",
    "Write a short paragraph about {subject} for a school newsletter.",
    "What is the history of {subject}?",
    "Write a short story about {character} in {place}.",
    "Tell a bedtime story about {character}.",
    "Write a funny story about {character} who loses something important.",
    "Write the opening of a mystery novel set in {place}.",
    "Write a poem about {subject}.",
    "Write a haiku about {place}.",
    "Describe {place} in vivid detail.",
    "Help me plan {thing}.",
    "Give me a step-by-step plan for {thing}.",
    "What do I need to prepare for {thing}?",
    "Make a checklist for {thing}.",
    "List five ideas for {thing}.",
    "Write a friendly email inviting my colleagues to {thing}.",
    "Write a short thank-you note to a friend who helped me with {thing}.",
    "What are common mistakes people make with {thing}?",
    "Compare {subject} and {subject2} in a few sentences.",
    "What is the difference between {subject} and {subject2}?",
    "Write a {language} function that {task}.",
    "How do I write a program in {language} that {task}? Show the code.",
    "Explain how to write code that {task}, step by step.",
    "Write a {language} script that {task} and explain how it works.",
)


def chat_instructions(n: int, seed: int, exclude: Collection[str] = ()) -> list[str]:
    """n distinct chat-style instructions (advice, stories, explanations, plans, letters, code), none in `exclude`.

    Raises:
        ValueError: the templates cannot fill n distinct prompts.
    """
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    out: dict[str, None] = {}  # insertion-ordered set
    for _ in range(100 * n):
        if len(out) == n:
            break
        situation = pick(_SITUATIONS)
        subject, subject2 = pick(_SUBJECTS), pick(_SUBJECTS)
        if subject == subject2:
            continue
        prompt = pick(_CHAT_TEMPLATES).format(
            situation=situation,
            situation_cap=situation[0].upper() + situation[1:],
            subject=subject,
            subject2=subject2,
            character=pick(_CHARACTERS),
            place=pick(_PLACES),
            thing=pick(_THINGS),
            language=pick(_LANGUAGES),
            task=pick(_TASKS),
        )
        if prompt not in exclude:
            out[prompt] = None
    if len(out) < n:
        raise ValueError(f"the chat templates give only {len(out)} distinct instructions, {n} asked for")
    return list(out)


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
    """n distinct instruction prompts from templates filled with sentences and topic words of `docs` and programming
    tasks (distinct, so that no held-out answer is a copy of a training one).

    Raises:
        ValueError: the documents cannot fill n distinct prompts.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}  # insertion-ordered set
    for _ in range(100 * n):
        if len(out) == n:
            break
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        doc = docs[int(rng.integers(len(docs)))]
        start = int(rng.integers(max(1, len(doc) - 2000)))
        window = doc[start : start + 2000]
        sentences, topics = _SENTENCE.findall(window), _TOPIC.findall(window)
        if ("{sentence}" in template and not sentences) or ("{topic}" in template and not topics):
            continue
        prompt = template.format(
            sentence=" ".join(str(sentences[int(rng.integers(len(sentences)))]).split()) if sentences else "",
            topic=str(topics[int(rng.integers(len(topics)))]) if topics else "",
            language=_LANGUAGES[int(rng.integers(len(_LANGUAGES)))],
            task=_TASKS[int(rng.integers(len(_TASKS)))],
        )
        out[prompt] = None
    if len(out) < n:
        raise ValueError(f"the documents give only {len(out)} distinct instructions, {n} asked for")
    return list(out)


def greedy_answers(
    runner: PrimaryRunner,
    prompts: Sequence[Sequence[int]],
    max_new: int,
    stop_ids: Collection[int],
    *,
    record: bool = False,
) -> Iterator[tuple[int, list[int], np.ndarray | None]]:
    """The primary's greedy answers, decoding every cache slot together; yields (prompt index, answer ids, states).

    An answer ends after a stop token (kept) or `max_new` tokens; its slot then takes the next prompt. Slots freed
    in the same step are prefilled together in one ragged call, so an accelerator stays busy with wide batches.

    Args:
        record: also yield the runner's tapped states of prompt + answer, [n, n_taps, P] float16 (None otherwise),
            taken from the very passes that wrote the answer; the answer's last token is never fed, so its row is 0.
    """
    queue = iter(enumerate(prompts))
    active: dict[int, tuple[int, list[int]]] = {}  # slot -> (prompt index, answer so far)
    states: dict[int, list[np.ndarray]] = {}  # slot -> tapped states of the positions fed so far

    def fill(slots: Sequence[int]) -> None:
        taken = list(zip(slots, queue, strict=False))  # zip takes a slot first: no prompt is drawn and dropped
        if not taken:
            return
        sizes = [len(ids) for _, (_, ids) in taken]
        block = np.zeros((len(taken), max(sizes)), np.int32)
        for b, (slot, (_, ids)) in enumerate(taken):
            runner.truncate(slot, 0)
            block[b, : sizes[b]] = ids
        out = runner.forward(block, rows=[slot for slot, _ in taken], sizes=sizes)
        for b, (slot, (i, _)) in enumerate(taken):
            runner.commit(slot, sizes[b])
            active[slot] = (i, [int(out.top[b, sizes[b] - 1])])
            if record:
                states[slot] = [out.hidden[b, : sizes[b]].astype(STATE_DTYPE)]

    def finished(slot: int) -> tuple[int, list[int], np.ndarray | None]:
        i, answer = active.pop(slot)
        if not record:
            return i, answer, None
        fed = states.pop(slot)
        return i, answer, np.concatenate([*fed, np.zeros_like(fed[0][:1])])  # the last token's row: never fed

    fill(range(runner.batch))
    while active:
        done = [s for s, (_, ans) in active.items() if ans[-1] in stop_ids or len(ans) >= max_new]
        for slot in done:
            yield finished(slot)
        fill(done)
        if not active:
            break
        rows = sorted(active)
        out = runner.forward(np.asarray([[active[s][1][-1]] for s in rows]), rows=rows)
        hidden = out.hidden.astype(STATE_DTYPE) if record else None  # [B, 1, n_taps, P]
        for b, slot in enumerate(rows):
            runner.commit(slot, 1)
            active[slot][1].append(int(out.top[b, 0]))
            if hidden is not None:
                states[slot].append(hidden[b])


def corpus_instructions(cfg: DistillConfig) -> list[str]:
    """The templated instructions `build` answers by default, from the pinned corpus sources' training documents."""
    return instructions([d for texts in fetch_texts().values() for d in texts], cfg.prompts, cfg.seed)


def build(
    out_dir: Path,
    runner: PrimaryRunner,
    tokenizer: Tokenizer,
    cfg: DistillConfig,
    *,
    prompts: Sequence[str] | None = None,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Generates (or resumes) the self-distillation corpus in out_dir; returns its progress record.

    Args:
        prompts: the instructions to answer, at least cfg.prompts of them (default: `corpus_instructions(cfg)`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_path = out_dir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {"done": 0, "tokens": 0}
    if progress.get("config", dataclasses.asdict(cfg)) != dataclasses.asdict(cfg):
        raise ValueError(f"{out_dir} was started with other settings: {progress['config']}")
    prompts = corpus_instructions(cfg) if prompts is None else prompts[: cfg.prompts]
    if len(prompts) < cfg.prompts:
        raise ValueError(f"{cfg.prompts} instructions asked for, {len(prompts)} given")
    chats = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    is_val = validation_mask("self-distill", cfg.prompts, cfg.val_fraction, cfg.seed)
    todo = list(range(progress["done"], cfg.prompts))
    start = time.monotonic()
    record = bool(runner.taps)
    if record:
        progress.setdefault("taps", list(runner.taps))
        if progress["taps"] != list(runner.taps):
            raise ValueError(f"{out_dir} records taps {progress['taps']}, the runner taps {list(runner.taps)}")
        for split in ("train", "val"):  # an interrupted run may have written states past its last recorded example
            tokens_file, states_file = out_dir / f"{split}.bin", out_dir / f"{split}.{STATES_SUFFIX}"
            rows = tokens_file.stat().st_size // TOKEN_DTYPE.itemsize if tokens_file.exists() else 0
            row_bytes = len(runner.taps) * runner.cfg.d_model * STATE_DTYPE.itemsize
            have = states_file.stat().st_size // row_bytes if states_file.exists() else 0
            if have < rows:
                raise ValueError(
                    f"{tokens_file} holds {rows} tokens but states for {have}: record the rest first "
                    "(tandem record-states), or write to a new --out"
                )
            with states_file.open("ab") as f:
                f.truncate(rows * row_bytes)
    results: dict[int, tuple[list[int], np.ndarray | None]] = {}
    answers = greedy_answers(runner, [chats[j] for j in todo], cfg.max_new, tokenizer.stop_token_ids, record=record)
    for i, answer, states in answers:
        results[todo[i]] = answer, states
        while progress["done"] in results:  # append in prompt order so a resumed run continues exactly
            j = progress["done"]
            answer, states = results.pop(j)
            example = np.asarray([*chats[j], *answer], dtype=TOKEN_DTYPE)
            split = "val" if is_val[j] else "train"
            if states is not None:  # states first: a run stopped between the two writes leaves extra states rows
                with (out_dir / f"{split}.{STATES_SUFFIX}").open("ab") as f:
                    f.write(states.tobytes())
            with (out_dir / f"{split}.bin").open("ab") as f:
                f.write(example.tobytes())
            progress.update(done=j + 1, tokens=progress["tokens"] + int(example.size), config=dataclasses.asdict(cfg))
            progress_path.write_text(json.dumps(progress) + "\n")
        if max_minutes is not None and (time.monotonic() - start) / 60 >= max_minutes:
            break
    manifest = {
        "format": "self-distill",
        "dtype": "uint16 little-endian",
        "layout": "each example: the chat-templated prompt, then the primary's greedy answer (ending in EOS or cut)",
        "states": states_entry(runner.taps, runner.cfg.d_model) if record else None,
        "prompts_done": progress["done"],
        "tokens": progress["tokens"],
        "config": dataclasses.asdict(cfg),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return progress
