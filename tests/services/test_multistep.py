"""Multi-step decoding: a primary-only Primary call that runs several one-token steps returns exactly the tokens (and,
sampled, the draws) of as many one-step calls, alone or batched with other sessions; under load the orchestrator asks
for it (LoadPolicy.multi_step) and the output is still the primary's own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import make_engine
from test_services import Stack

from orchestrator.load import LoadPolicy
from tandem.config import BatchingConfig, SamplingParams
from tandem.decoding.rounds import MAX_STEPS, GenerationStats, Request, run_request
from tandem.errors import ContextFullError, InvalidRequestError
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=11)


def _one_step_tokens(worker, session: str, prompt: list[int], sampling: SamplingParams, n: int) -> list[int]:
    token = worker.prefill(session, prompt, sampling, False).next_token
    out = []
    for _ in range(n):
        token = worker.verify(session, [token], [], True, False).next_token
        out.append(token)
    worker.release(session)
    return out


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_a_multi_step_call_equals_one_step_calls(tiny_params, sampling: SamplingParams) -> None:
    """Two multi-step calls of 5 and 3 steps, between one-step calls of another session, give the tokens of 8
    one-step calls, and the session's cache is where theirs would be: the next one-step call agrees too."""
    worker = make_engine(tiny_params, max_len=128, slots=4).primary_worker
    prompt = [3, 17, 9, 4]
    want = _one_step_tokens(worker, "ref", prompt, sampling, 9)
    token = worker.prefill("m", prompt, sampling, False).next_token
    other = worker.prefill("other", [8, 1, 30], SamplingParams(), False).next_token
    got: list[int] = []
    for steps in (5, 3):
        step = worker.verify("m", [token], [], True, False, steps)
        assert len(step.prior) == steps - 1 and step.accepted == 0 and step.hidden is None
        got += [*step.prior, step.next_token]
        token = step.next_token
        other = worker.verify("other", [other], [], True, False).next_token
    got.append(worker.verify("m", [token], [], True, False).next_token)
    assert got == want
    assert int(worker.runner.lengths[worker.pool.get("m").slot]) == len(prompt) + 9


def test_multi_step_calls_of_several_sessions_run_batched(tiny_params) -> None:
    """Rows with different step counts (and a one-step call) in one batch: each row stops after its own steps."""
    engine = make_engine(tiny_params, max_len=128, slots=4, batching=BatchingConfig(window_s=0.5))
    worker = engine.primary_worker
    prompts = {"a": [3, 17, 9, 4], "b": [40, 2, 11], "c": [8, 1, 30, 30, 12]}
    counts = {"a": 6, "b": 1, "c": 4}
    want = {s: _one_step_tokens(worker, s, p, SamplingParams(), counts[s]) for s, p in prompts.items()}
    first = {s: worker.prefill(s, p, SamplingParams(), False).next_token for s, p in prompts.items()}
    barrier = threading.Barrier(len(prompts))

    def run(s: str) -> list[int]:
        barrier.wait()
        step = worker.verify(s, [first[s]], [], True, False, counts[s])
        return [*step.prior, step.next_token]

    batches = worker.batcher.batches
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = dict(zip(prompts, pool.map(run, prompts), strict=True))
    assert got == want
    assert worker.batcher.batches - batches < len(prompts)  # they did share a batch


def test_multi_step_input_is_checked(tiny_params) -> None:
    worker = make_engine(tiny_params, max_len=32, slots=2).primary_worker
    token = worker.prefill("s", list(range(1, 21)), SamplingParams(), False).next_token
    for tokens, hidden, steps in (
        ([token, 5], False, 2),
        ([token], True, 2),
        ([token], False, MAX_STEPS + 1),
        ([token], False, -1),
    ):
        with pytest.raises(InvalidRequestError, match="steps must lie in"):
            worker.verify("s", tokens, [], True, hidden, steps)
    with pytest.raises(ContextFullError, match="context full"):
        worker.verify("s", [token], [], True, False, 13)  # 20 cached + 13 > 32
    assert worker.verify("s", [token], [], True, False, 0).prior == ()  # 0 = one step
    with pytest.raises(ValueError, match="multi_step"):
        LoadPolicy(multi_step=0)


def test_run_request_with_multi_step_is_lossless(tiny_params) -> None:
    engine = make_engine(tiny_params, max_len=128)
    prompt = (5, 9, 2, 30)
    want = engine.generate(prompt, mode="primary", max_tokens=23).token_ids
    stats = GenerationStats()
    chunks = list(
        run_request(
            Request(prompt, "primary", 23),
            "s",
            engine.primary_worker,
            None,
            max_tokens=23,
            stats=stats,
            primary_steps=lambda _sessions: 4,
        )
    )
    assert [t for c in chunks for t in c] == want
    assert [len(c) for c in chunks] == [1, 4, 4, 4, 4, 4, 2]  # the prefill's token, then 4 a call, cut to max_tokens
    assert stats.primary_calls == 7 and len(engine.primary_worker.pool) == 0


def test_under_load_requests_run_multi_step_through_grpc(tiny_params) -> None:
    """With another session on the primary (the load from 2 on), primary and shed tandem-speed requests, greedy and
    seeded sampled, stream the primary's own tokens in chunks of `multi_step`."""
    stack = Stack(tiny_params, load=LoadPolicy(multi_step=3))
    try:
        stack.primary_worker.prefill("another-request", [7, 7, 1], SamplingParams(), False)
        prompt = [3, 17, 9, 4]
        for mode in ("primary", "tandem-speed"):
            for sampling in (SamplingParams(), SAMPLED):
                want = stack.reference.generate(tuple(prompt), mode="primary", max_tokens=12, sampling=sampling)
                kw = dict(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
                chunks = [r.token_ids for r in stack.client.generate(prompt, mode=mode, max_tokens=12, **kw)]
                assert [t for c in chunks for t in c] == want.token_ids, (mode, sampling)
                assert [len(c) for c in chunks if c] == [1, 3, 3, 3, 2], (mode, sampling)
        stack.primary_worker.release("another-request")
        chunks = [r.token_ids for r in stack.client.generate(prompt, mode="primary", max_tokens=5)]
        assert [len(c) for c in chunks if c] == [1, 1, 1, 1, 1]  # alone: one step a call
        with grpc.insecure_channel(stack.primary.address) as ch:
            primary = pb_grpc.PrimaryStub(ch)
            primary.Prefill(pb.PrefillRequest(session_id="direct", prompt_ids=[1, 2]))
            for bad in (
                pb.VerifyRequest(session_id="direct", tokens=[1, 2], steps=2),
                pb.VerifyRequest(session_id="direct", tokens=[1], steps=MAX_STEPS + 1),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    primary.Verify(bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps" in err.value.details()
            step = primary.Verify(pb.VerifyRequest(session_id="direct", tokens=[1], steps=4))
            assert len(step.prior_tokens) == 3 and step.sessions == 1
            primary.Release(pb.ReleaseRequest(session_id="direct"))
        assert stack.settled_sessions() == 0
    finally:
        stack.close()
