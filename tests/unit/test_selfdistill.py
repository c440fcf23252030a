"""Self-distillation data: templated instructions and the primary's batched greedy answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY

from tandem.decoding.engine import Engine
from tandem.model.primary import LlamaParams, PrimaryRunner
from tandem.training.selfdistill import chat_instructions, greedy_answers, instructions
from tandem.training.states import STATE_DTYPE, answer_mask, example_bounds, record

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
    got = {i: answer for i, answer, _ in greedy_answers(runner, prompts, max_new=10, stop_ids=stop)}
    assert sorted(got) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        want = tiny_engine.generate(prompt, mode="primary", max_tokens=10).token_ids
        cut = next((j + 1 for j, t in enumerate(want) if t in stop), len(want))
        assert got[i] == want[:cut], i  # an answer keeps its stop token


def test_recorded_states_equal_a_prefill_of_the_example(tiny_params: LlamaParams) -> None:
    """States recorded while the primary writes are, row for row, a fresh prefill's of prompt + answer (the last
    token, never fed, has a zero row), so a drafter trained on them sees what serving gives it."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, TINY.vocab_size, size=int(n)).tolist() for n in (4, 11, 6)]
    runner = PrimaryRunner(TINY, tiny_params, taps=(1, TINY.n_layers), batch=2, max_len=64)
    fresh = PrimaryRunner(TINY, tiny_params, taps=(1, TINY.n_layers), batch=1, max_len=64)
    for i, answer, states in greedy_answers(runner, prompts, max_new=7, stop_ids=set(), record=True):
        example = [*prompts[i], *answer]
        assert states is not None and states.shape == (len(example), 2, TINY.d_model)
        fresh.truncate(0, 0)
        want = fresh.forward(np.asarray([example[:-1]])).hidden[0].astype(np.float16)
        np.testing.assert_allclose(states[:-1].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
        assert not states[-1].any()


def test_chat_instructions_are_distinct_reproducible_and_not_held_out() -> None:
    got = chat_instructions(500, seed=0)
    assert got == chat_instructions(500, seed=0) and got != chat_instructions(500, seed=1)
    assert len(set(got)) == 500 and not any("{" in p for p in got)
    assert got[0] not in chat_instructions(500, seed=0, exclude={got[0]})


def test_example_bounds_and_answer_mask() -> None:
    """Chat examples stored back to back split at each '<|im_start|>system'; answers follow 'assistant\\n'."""
    one = [1, 9690, 198, 7, 2, 1, 520, 9531, 198, 50, 51, 2]
    tokens = np.asarray([*one, *one[:-1], 52, 2], np.uint16)
    assert example_bounds(tokens) == [(0, 12), (12, 25)]
    assert answer_mask(tokens).nonzero()[0].tolist() == [9, 10, 11, 21, 22, 23, 24]


@pytest.mark.slow
def test_record_recomputes_the_states_written_with_the_answers(tiny_params: LlamaParams, tmp_path) -> None:
    """`record` (a prefill pass over a corpus kept without its states) writes, row for row, what recording while
    writing gives, resumes where it stopped, and marks the manifest once a split is complete."""
    rng = np.random.default_rng(3)
    start = [1, 2]
    prompts = [[*start, *rng.integers(3, TINY.vocab_size, size=int(n)).tolist()] for n in (3, 8, 5, 6, 2)]
    writer = PrimaryRunner(TINY, tiny_params, taps=(2, TINY.n_layers), batch=2, max_len=64)
    tokens, want = [], []
    for i, answer, states in sorted(greedy_answers(writer, prompts, max_new=6, stop_ids=set(), record=True)):
        tokens += [*prompts[i], *answer]
        want.append(states)
    np.asarray(tokens, np.uint16).tofile(tmp_path / "train.bin")
    runner = PrimaryRunner(TINY, tiny_params, taps=(2, TINY.n_layers), batch=2, max_len=64)
    first = record(tmp_path, runner, max_minutes=0, log_every=0, example_start=start)  # stops after one batch
    assert first["examples"] == 2 and not (tmp_path / "manifest.json").exists()
    done = record(tmp_path, runner, log_every=0, example_start=start)
    assert done["examples"] == done["total_examples"] == 5
    got = np.fromfile(tmp_path / "train.states.f16", dtype=STATE_DTYPE).reshape(len(tokens), 2, TINY.d_model)
    np.testing.assert_allclose(got.astype(np.float32), np.concatenate(want).astype(np.float32), atol=2e-3, rtol=2e-3)
    assert json.loads((tmp_path / "manifest.json").read_text())["states"]["taps"] == [2, TINY.n_layers]
