"""Self-distillation data: templated instructions and the primary's batched greedy answers."""

from __future__ import annotations

import numpy as np
from conftest import TINY

from tandem.decoding.engine import Engine
from tandem.model.primary import LlamaParams, PrimaryRunner
from tandem.training.selfdistill import greedy_answers, instructions

DOCS = [
    "The Mississippi River flows south. It carries water from many states into the Gulf of Mexico every year. "
    "Farmers along its banks depend on the river for irrigation and for transport of their crops to market.",
    "Whales are the largest animals that have ever lived on the Earth, and some of them sing long songs at sea.",
]


def test_instructions_are_filled_and_reproducible() -> None:
    got = instructions(DOCS, 40, seed=3)
    assert got == instructions(DOCS, 40, seed=3) and got != instructions(DOCS, 40, seed=4)
    assert len(got) == len(set(got)) == 40 and not any("{" in p for p in got)
    assert any("function" in p for p in got) and any("Mississippi" in p or "Whales" in p for p in got)


def test_batched_answers_equal_one_request_at_a_time(tiny_engine: Engine, tiny_params: LlamaParams) -> None:
    """Rows decoded together, refilled as they finish, answer exactly like the engine's primary mode alone."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY.vocab_size, size=int(n)).tolist() for n in (5, 9, 3, 12, 7)]
    stop = {int(rng.integers(TINY.vocab_size))}
    runner = PrimaryRunner(TINY, tiny_params, batch=2, max_len=64)
    got = dict(greedy_answers(runner, prompts, max_new=10, stop_ids=stop))
    assert sorted(got) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        want = tiny_engine.generate(prompt, mode="primary", max_tokens=10).token_ids
        cut = next((j + 1 for j, t in enumerate(want) if t in stop), len(want))
        assert got[i] == want[:cut], i  # an answer keeps its stop token
