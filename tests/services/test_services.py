"""The three services in this process on loopback ports, with tiny random models: losslessness through gRPC,
cancellation, health, reflection and error statuses."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import SPECULATE_ALWAYS, TINY, make_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.server import OrchestratorServiceConfig
from orchestrator.server import build_server as build_orchestrator
from primary_svc.server import PrimaryServiceConfig
from primary_svc.server import build_server as build_primary
from secondary_svc.server import SecondaryServiceConfig
from secondary_svc.server import build_server as build_secondary
from tandem.config import SamplingParams, SpecConfig
from tandem.decoding.workers import DrafterWorker, PrimaryWorker
from tandemrpc.client import AsyncTandemClient, TandemClient, build_request
from tandemrpc.convert import numpy_to_tensor
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

MAX_LEN = 256


class Stack:
    """Primary, Secondary and Orchestrator servers around tiny models, plus the same models in process."""

    def __init__(self, tiny_params, **core_kw) -> None:
        served = make_engine(tiny_params, max_len=MAX_LEN, slots=4)  # the services' models
        self.reference = make_engine(tiny_params, max_len=MAX_LEN)  # identical weights, in process
        self.primary_worker = PrimaryWorker(served.primary)
        self.drafters = {
            "tandem": DrafterWorker(served.drafters["tandem"].runner),
            "vanilla": DrafterWorker(served.drafters["speed"].runner),
        }
        self.primary = build_primary(self.primary_worker, PrimaryServiceConfig(metrics_port=0)).start()
        self.secondary = build_secondary(self.drafters, SecondaryServiceConfig(metrics_port=0)).start()
        core = OrchestratorConfig(
            primary_target=self.primary.address,
            secondary_target=self.secondary.address,
            vocab_size=TINY.vocab_size,
            max_len=MAX_LEN,
            max_tokens_limit=128,
            default_spec=SpecConfig(gamma_max=4, tau=0.0),
            **{"payoff": SPECULATE_ALWAYS, **core_kw},
        )
        self.orchestrator, self.core = build_orchestrator(OrchestratorServiceConfig(metrics_port=0, core=core), None)
        self.orchestrator.start()
        self.client = TandemClient(self.orchestrator.address, timeout_s=60)

    def live_sessions(self) -> int:
        return len(self.primary_worker.pool) + sum(len(w.pool) for w in self.drafters.values())

    def settled_sessions(self, within_s: float = 1.0) -> int:
        """Live sessions once releases in flight have landed (the secondary closes when its stream ends) and the
        orchestrator's requests have left admission (a client sees its last chunk before the server's cleanup)."""
        deadline = time.monotonic() + within_s
        while (self.live_sessions() or self.core.admission.running) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.live_sessions()

    def close(self) -> None:
        self.client.close()
        for s in (self.orchestrator, self.secondary, self.primary):
            s.stop(0)
        self.core.close()


@pytest.fixture(scope="module")
def stack(tiny_params) -> Iterator[Stack]:
    s = Stack(tiny_params)
    yield s
    s.close()


def _tokens(chunks) -> tuple[list[int], list[pb.GenerateResponse]]:
    chunks = list(chunks)
    return [t for c in chunks for t in c.token_ids], chunks


PROMPTS = [[3, 17, 9], [40, 2, 11, 5, 23], [8, 1, 30, 30, 12, 44, 7]]


def test_grpc_output_equals_in_process(stack: Stack) -> None:
    spec = SpecConfig(gamma_max=4, tau=0.0)
    for prompt in PROMPTS:
        want = stack.reference.generate(prompt, mode="primary", max_tokens=40).token_ids
        for mode in ("primary", "speed", "tandem-speed"):
            got, chunks = _tokens(stack.client.generate(prompt, mode=mode, max_tokens=40))
            assert got == want, mode
            last = chunks[-1]
            assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 40
            if mode != "primary":
                assert last.stats.rounds > 0 and last.stats.drafted_tokens >= last.stats.rounds
        standalone = stack.reference.generate(prompt, mode="tandem", max_tokens=40, spec=spec).token_ids
        assert _tokens(stack.client.generate(prompt, mode="tandem", max_tokens=40))[0] == standalone
    assert stack.settled_sessions() == 0
    # Every prompt ran once per mode: all but its first run reused its positions from the prefix cache.
    assert _metric(stack.primary.metrics_port, "tandem_primary_prefix_hits") >= 3 * len(PROMPTS)
    assert _metric(stack.primary.metrics_port, "tandem_primary_prefix_reused_positions") > 0


@pytest.mark.parametrize("min_accepted", [0.0, 3.0])  # 3: paused speculation, which depends on the tokens only
def test_seeded_sampling_matches_in_process(stack: Stack, min_accepted: float) -> None:
    spec = SpecConfig(gamma_max=4, tau=0.0, min_accepted=min_accepted)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    paused = 0
    for mode in ("speed", "tandem-speed"):
        want = stack.reference.generate(PROMPTS[0], mode=mode, max_tokens=30, sampling=sampling, spec=spec)
        got, chunks = _tokens(
            stack.client.generate(
                PROMPTS[0], mode=mode, max_tokens=30, temperature=1.0, top_p=0.9, seed=5, min_accepted=min_accepted
            )
        )
        assert got == want.token_ids and chunks[-1].stats.paused_steps == want.stats.paused_steps, mode
        paused += want.stats.paused_steps
    assert (paused > 0) == (min_accepted > 0)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_prompt_lookup_through_grpc_matches_in_process(stack: Stack, sampled: bool) -> None:
    """lookup_ngram travels from the public request to the drafter (GenerateRequest, then DraftStart): through gRPC a
    request drafts, keeps and emits what it does in process, and the served drafters answer rounds by lookup."""
    spec = SpecConfig(gamma_max=4, tau=0.0, lookup_ngram=2)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=7) if sampled else SamplingParams()
    kw = dict(temperature=1.0, top_p=0.9, seed=7) if sampled else {}
    for mode in ("speed", "tandem-speed"):
        worker = stack.drafters["tandem" if mode == "tandem-speed" else "vanilla"]
        served, looked_up = worker.lookup_rounds, 0
        for prompt in PROMPTS:
            want = stack.reference.generate(prompt, mode=mode, max_tokens=40, sampling=sampling, spec=spec)
            got, chunks = _tokens(stack.client.generate(prompt, mode=mode, max_tokens=40, lookup_ngram=2, **kw))
            st = chunks[-1].stats
            assert got == want.token_ids, (mode, prompt)
            assert (st.drafted_tokens, st.accepted_tokens) == (want.stats.drafted_tokens, want.stats.accepted_tokens)
            w = want.stats
            assert (st.lookup_rounds, st.lookup_drafted_tokens, st.lookup_accepted_tokens) == (
                w.lookup_rounds,
                w.lookup_drafted_tokens,
                w.lookup_accepted_tokens,
            )
            looked_up += w.lookup_rounds
        assert worker.lookup_rounds - served == looked_up > 0, mode
        # 0: off, so the drafter model drafts every round.
        served = worker.lookup_rounds
        _tokens(stack.client.generate(PROMPTS[0], mode=mode, max_tokens=40, lookup_ngram=0, **kw))
        assert worker.lookup_rounds == served, mode
    assert stack.settled_sessions() == 0


def test_cancel_releases_every_session(stack: Stack) -> None:
    call = stack.client.stub.Generate(build_request(PROMPTS[1], max_tokens=120, mode="tandem-speed"))
    next(call), next(call)  # the prefill's token, then a round's: both model services hold the session
    assert stack.live_sessions() == 2
    call.cancel()
    assert stack.settled_sessions() == 0
    # ... and the services' own metrics say so
    assert _metric(stack.primary.metrics_port, "tandem_primary_slots_used") == 0
    assert _metric(stack.secondary.metrics_port, 'tandem_secondary_slots_used{drafter="tandem"}') == 0
    assert _metric(stack.orchestrator.metrics_port, "tandem_requests_running") == 0


def test_deadline_releases_every_session(stack: Stack) -> None:
    request = build_request(PROMPTS[1], max_tokens=128, mode="speed")
    list(stack.client.stub.Generate(request))  # compile every shape bucket first: a compile holds the worker's lock
    start = time.perf_counter()
    list(stack.client.stub.Generate(request))
    call = stack.client.stub.Generate(request, timeout=(time.perf_counter() - start) / 5)  # expires mid-request
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stack.settled_sessions() == 0


def _metric(port: int | None, series: str) -> float:
    """One sample from a service's Prometheus page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{series} not exported on :{port}")


def test_speculation_counters_are_exported(stack: Stack) -> None:
    before = _metric(stack.orchestrator.metrics_port, "tandem_spec_num_drafts_total")
    _, chunks = _tokens(stack.client.generate(PROMPTS[2], mode="tandem-speed", max_tokens=20))
    rounds = chunks[-1].stats.rounds
    assert _metric(stack.orchestrator.metrics_port, "tandem_spec_num_drafts_total") == before + rounds
    assert _metric(stack.orchestrator.metrics_port, "tandem_spec_num_draft_tokens_total") >= rounds


def test_health_and_reflection(stack: Stack) -> None:
    for server in (stack.primary, stack.secondary, stack.orchestrator):
        with grpc.insecure_channel(server.address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            listed = next(
                reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            )
            names = {s.name for s in listed.list_services_response.service}
            assert server.service_names[0] in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        (dict(prompt=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (dict(prompt=[1, 2], max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (dict(prompt=[1, 2], max_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (dict(prompt=[1, 2], temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(prompt=[1, 2], temperature=1.0, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(prompt=[1, 2], gamma_max=99), grpc.StatusCode.INVALID_ARGUMENT, "gamma_max"),
        (dict(prompt=[1, 2], min_accepted=9.0), grpc.StatusCode.INVALID_ARGUMENT, "min_accepted"),
        (dict(prompt=[1, 2], lookup_ngram=-1), grpc.StatusCode.INVALID_ARGUMENT, "lookup_ngram must be >= 0"),
        (dict(prompt=[1, TINY.vocab_size]), grpc.StatusCode.INVALID_ARGUMENT, "token ids"),
        (dict(prompt="hello"), grpc.StatusCode.INVALID_ARGUMENT, "tokenizer"),
    ],
)
def test_bad_public_requests(stack: Stack, kwargs: dict, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.generate(**kwargs))
    assert err.value.code() == code and message in err.value.details()
    assert len(_tokens(stack.client.generate([1, 2], max_tokens=3))[0]) == 3  # still serving


def test_unknown_mode(stack: Stack) -> None:
    req = build_request([1, 2], max_tokens=3)
    req.mode = 99  # type: ignore[assignment]
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown mode" in err.value.details()


def test_internal_api_errors(stack: Stack) -> None:
    with grpc.insecure_channel(stack.primary.address) as ch:
        primary = pb_grpc.PrimaryStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            primary.Verify(pb.VerifyRequest(session_id="nope", tokens=[1]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not primary.Release(pb.ReleaseRequest(session_id="nope")).released
        with pytest.raises(grpc.RpcError) as err:
            primary.Prefill(pb.PrefillRequest(session_id="", prompt_ids=[1]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(stack.secondary.address) as ch:
        secondary = pb_grpc.SecondaryStub(ch)
        bad_tensors = [
            pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=[3, 2, 32], data=b"\0" * 10),  # wrong byte length
            pb.Tensor(dtype=7, shape=[3, 2, 32], data=b""),  # unknown dtype
            numpy_to_tensor(np.full((3, 2, TINY.d_model), np.nan, np.float32)),  # NaN
            numpy_to_tensor(np.zeros((2, 2, TINY.d_model), np.float32)),  # wrong shape for a 3-token prompt
        ]
        for t in bad_tensors:
            start = pb.DraftStart(session_id="s1", prompt_ids=[1, 2, 3], hidden=t, first_token=4, gamma_max=2)
            with pytest.raises(grpc.RpcError) as err:
                list(secondary.Draft(iter([pb.DraftRequest(start=start)])))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, t.shape
        start = pb.DraftStart(session_id="s3", prompt_ids=[1, 2, 3], first_token=4, gamma_max=2, lookup_ngram=-2)
        with pytest.raises(grpc.RpcError) as err:
            list(secondary.Draft(iter([pb.DraftRequest(start=start)])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lookup_ngram" in err.value.details()
        adv = pb.DraftRequest(advance=pb.DraftAdvance(accepted=0, next_token=1))
        with pytest.raises(grpc.RpcError) as err:
            list(secondary.Draft(iter([adv])))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # After a pause: states for t_0 and each skipped token, and skipped tokens in the vocabulary.
        states = numpy_to_tensor(np.zeros((3, 2, TINY.d_model), np.float32))
        start = pb.DraftStart(session_id="s2", prompt_ids=[1, 2, 3], hidden=states, first_token=4, gamma_max=2)
        for rows, skipped, message in ((1, [5, 6], "primary states of shape (3,"), (2, [TINY.vocab_size], "token ids")):
            hidden = numpy_to_tensor(np.zeros((rows, 2, TINY.d_model), np.float32))
            adv = pb.DraftAdvance(accepted=0, hidden=hidden, next_token=1, max_drafts=2, skipped=skipped)
            with pytest.raises(grpc.RpcError) as err:
                list(secondary.Draft(iter([pb.DraftRequest(start=start), pb.DraftRequest(advance=adv)])))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), skipped
    assert stack.settled_sessions() == 0


def test_pool_exhaustion_is_resource_exhausted(stack: Stack) -> None:
    calls = [stack.client.stub.Generate(build_request(PROMPTS[0], max_tokens=100, mode="primary")) for _ in range(4)]
    for c in calls:
        next(c)
    with pytest.raises(grpc.RpcError) as err:
        list(stack.client.generate(PROMPTS[0], max_tokens=5, mode="primary"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for c in calls:
        c.cancel()
    assert stack.settled_sessions() == 0


def _grpcurl() -> str:
    exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(exe).exists():
        pytest.skip("grpcurl is not installed (dev extra, x86_64 only)")
    return exe


def test_grpcurl_lists_and_calls_the_public_api(stack: Stack) -> None:
    exe, addr = _grpcurl(), stack.orchestrator.address
    listed = subprocess.run([exe, "-plaintext", addr, "list"], capture_output=True, text=True, timeout=30, check=True)
    assert "tandem.v1.Orchestrator" in listed.stdout.split()
    body = json.dumps({"token_ids": {"ids": PROMPTS[0]}, "max_tokens": 6, "mode": "MODE_TANDEM_SPEED"})
    out = subprocess.run(
        [exe, "-plaintext", "-d", body, addr, "tandem.v1.Orchestrator/Generate"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    chunks = [json.loads(c) for c in out.stdout.replace("}\n{", "}\x00{").split("\x00") if c.strip()]
    assert sum(len(c.get("token_ids", [])) for c in chunks) == 6  # grpcurl 1.8 prints proto field names
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"


def test_async_client(stack: Stack) -> None:
    async def run() -> list[int]:
        async with AsyncTandemClient(stack.orchestrator.address, timeout_s=60) as client:
            return [t async for chunk in client.generate(PROMPTS[0], max_tokens=10) for t in chunk.token_ids]

    assert asyncio.run(run()) == stack.reference.generate(PROMPTS[0], mode="primary", max_tokens=10).token_ids
    assert _metric(stack.primary.metrics_port, "tandem_primary_queue_depth") == 0


def test_a_finished_request_has_released_its_drafter_slot(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The orchestrator half-closes the draft stream and waits for the Secondary to release the session before the
    last chunk, so a back-to-back request on a one-slot Secondary never finds the slot still taken (even when the
    release is slow, as it is here)."""
    worker = stack.drafters["tandem"]
    release = worker.release

    def slow_release(session: str) -> bool:
        time.sleep(0.2)
        return release(session)

    monkeypatch.setattr(worker, "release", slow_release)
    # Load-aware speculation sheds the drafter while other requests hold admission places: let earlier tests'
    # requests finish unwinding first.
    assert stack.settled_sessions(within_s=5.0) == 0
    # An earlier test's drafter failure that ended its request (a cancellation or deadline) marks the Secondary down
    # for 2 s without counting a fallback; requests then skip the drafter. Wait for the probe to bring it back.
    deadline = time.monotonic() + 5.0
    while not stack.core._drafter_reachable() and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(2):
        chunks = list(stack.client.generate([3, 4, 5 + i], mode="tandem-speed", max_tokens=6))
        port = stack.orchestrator.metrics_port
        why: dict[str, object] = {
            m: _metric(port, m) for m in ("tandem_load_shed_total", "tandem_drafter_fallbacks_total")
        }
        why.update(secondary_down=stack.core.pools["secondary"].down_state(), running=stack.core.admission.running)
        assert chunks[-1].stats.rounds >= 1, f"request {i} did not speculate: {why}"
        assert stack.live_sessions() == 0, f"request {i} left a session behind"
