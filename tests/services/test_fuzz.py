"""Property-based fuzzing of all three APIs, internal tensor messages included: every request gets a clean status (never
INTERNAL or UNKNOWN), the servers keep serving, and no session leaks.

`TANDEM_FUZZ_EXAMPLES` sets the examples per API (default 250: 1,000 requests per run); the command in
docs/testing.md (Faults, hostile input, soak) runs 2,500 per API (10,000 requests).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_services import Stack

from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

# A numerical warning in a server thread becomes an exception there, so the call ends INTERNAL and the test fails.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
CLEAN = {  # statuses a person can act on; INTERNAL / UNKNOWN would mean a crash path
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

ints = st.one_of(st.integers(-3, 60), st.integers(-(2**31), 2**31 - 1))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
session_ids = st.one_of(st.sampled_from(["s1", "s2", "", "x" * 300]), st.text(max_size=20))


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """Tensors with any dtype value, shape (negative, huge, empty) and byte length, sometimes consistent."""
    dtype = draw(st.sampled_from([0, 1, 2, 7, -1]))
    shape = draw(st.lists(st.one_of(st.integers(-2, 5), st.integers(0, 2**40)), max_size=5))
    n = 1
    for d in shape:
        n *= max(d, 0)
    size = 4 if dtype == 1 else 2
    consistent = draw(st.booleans()) and n * size < 4096
    data = bytes(n * size) if consistent else draw(st.binary(max_size=64))
    if consistent and draw(st.booleans()):  # NaN / Inf payloads in a well-formed tensor
        data = (b"\x00\x00\xc0\x7f" if dtype == 1 else b"\x00\x7c") * n
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


sampling = st.builds(pb.SamplingParams, temperature=floats, top_k=ints, top_p=floats)
proposals = st.lists(
    st.builds(pb.SparseDistribution, token_ids=st.lists(ints, max_size=4), probs=st.lists(floats, max_size=4)),
    max_size=3,
)


@pytest.fixture(scope="module")
def stack(tiny_params) -> Iterator[Stack]:
    s = Stack(tiny_params)
    yield s
    s.close()


CALLS: dict[str, int] = {"primary": 0, "secondary": 0, "orchestrator": 0}  # requests sent, printed with -s


def _call(fn, *args, **kw):
    """Calls an RPC; returns the response or the status code (failing the test on a crash status)."""
    CALLS["primary"] += 1
    try:
        return fn(*args, timeout=30, **kw)
    except grpc.RpcError as e:
        assert e.code() in CLEAN, (e.code(), e.details())
        return e.code()


def test_fuzz_primary(stack: Stack) -> None:
    stub = pb_grpc.PrimaryStub(grpc.insecure_channel(stack.primary.address))

    @FUZZ
    @given(
        session=session_ids,
        prompt=st.lists(ints, max_size=12),
        params=sampling,
        hidden=st.booleans(),
        verify_tokens=st.lists(ints, max_size=10),
        props=proposals,
        standalone=st.booleans(),
        verify_first=st.booleans(),
    )
    def run(session, prompt, params, hidden, verify_tokens, props, standalone, verify_first) -> None:
        verify = pb.VerifyRequest(
            session_id=session, tokens=verify_tokens, proposals=props, standalone=standalone, want_hidden=hidden
        )
        if verify_first:  # a round for an unknown or not-yet-prefilled session
            _call(stub.Verify, verify)
        _call(
            stub.Prefill, pb.PrefillRequest(session_id=session, prompt_ids=prompt, sampling=params, want_hidden=hidden)
        )
        _call(stub.Verify, verify)
        _call(stub.Verify, verify)  # replayed round
        _call(stub.Release, pb.ReleaseRequest(session_id=session))

    run()
    assert stack.settled_sessions() == 0


def test_fuzz_secondary(stack: Stack) -> None:
    stub = pb_grpc.SecondaryStub(grpc.insecure_channel(stack.secondary.address))
    starts = st.builds(
        pb.DraftStart,
        session_id=session_ids,
        drafter=st.sampled_from([0, 1, 2, 9]),
        prompt_ids=st.lists(ints, max_size=8),
        hidden=tensors(),
        first_token=ints,
        sampling=sampling,
        gamma_max=ints,
        tau=floats,
        tau_first=floats,
        max_drafts=ints,
        draft_top_k=ints,
    )
    advances = st.builds(pb.DraftAdvance, accepted=ints, hidden=tensors(), next_token=ints, max_drafts=ints)
    messages = st.lists(
        st.one_of(starts.map(lambda s: pb.DraftRequest(start=s)), advances.map(lambda a: pb.DraftRequest(advance=a))),
        min_size=1,
        max_size=4,
    )

    @FUZZ
    @given(requests=messages)
    def run(requests) -> None:
        CALLS["secondary"] += 1
        try:
            for _ in stub.Draft(iter(requests), timeout=30):
                pass
        except grpc.RpcError as e:
            assert e.code() in CLEAN, (e.code(), e.details())

    run()
    assert stack.settled_sessions() == 0


def test_fuzz_orchestrator(stack: Stack) -> None:
    stub = pb_grpc.OrchestratorStub(grpc.insecure_channel(stack.orchestrator.address))
    inputs = st.one_of(
        st.builds(lambda t: {"token_ids": pb.TokenIds(ids=t)}, st.lists(ints, max_size=10)),
        st.builds(lambda t: {"text": t}, st.text(max_size=20)),
        st.builds(lambda m: {"chat": pb.ChatMessages(messages=m)},
                  st.lists(st.builds(pb.ChatMessage, role=st.text(max_size=8), content=st.text(max_size=20)),
                           max_size=2)),
    )  # fmt: skip

    @FUZZ
    @given(
        source=inputs,
        params=sampling,
        max_tokens=st.one_of(st.integers(-2, 12), ints),
        stop=st.lists(st.text(max_size=4), max_size=3),
        mode=st.sampled_from([0, 1, 2, 3, 4, 11]),
        gamma_max=st.one_of(st.integers(0, 20), ints),
        tau=st.one_of(st.none(), floats),
        tau_first=st.one_of(st.none(), floats),
    )
    def run(source, params, max_tokens, stop, mode, gamma_max, tau, tau_first) -> None:
        req = pb.GenerateRequest(
            sampling=params, max_tokens=max_tokens, stop=stop, mode=mode, gamma_max=gamma_max, **source
        )
        if tau is not None:
            req.tau = tau
        if tau_first is not None:
            req.tau_first = tau_first
        CALLS["orchestrator"] += 1
        try:
            for _ in stub.Generate(req, timeout=60):
                pass
        except grpc.RpcError as e:
            assert e.code() in CLEAN, (e.code(), e.details())

    run()
    assert stack.settled_sessions() == 0
    # and the stack still serves a plain request
    chunks = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=4), timeout=60))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    print(f"\nfuzzed requests: {CALLS} ({sum(CALLS.values())} in all), 0 crashes, 0 leaked sessions")
