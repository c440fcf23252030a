"""`tandem serve`'s stack: the three services as real OS processes with the bundled models, driven over gRPC, through
the `tandem generate` command line and through their metrics endpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from tandem.decoding.bundle import Bundle, BundleConfig, load_bundle
from tandemrpc.client import TandemClient, build_request
from tandemrpc.launch import ServeError, ServeStack, health_status
from tandemrpc.process import PARENT_ENV
from tandemrpc.v1 import tandem_pb2 as pb

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MAX_LEN, SLOTS = 512, 2
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
SERVICES = ("orchestrator", "primary", "secondary")


@dataclasses.dataclass
class Served:
    stack: ServeStack
    state_file: Path
    reference: Bundle  # the same models in this process

    @property
    def target(self) -> str:
        return self.stack.orchestrator_address


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    stack = ServeStack(
        max_len=MAX_LEN,
        slots=SLOTS,
        log_dir=tmp / "logs",
        startup_timeout_s=300,
        extra_args={"orchestrator": ["--no-payoff"]},  # these tests check how requests speculate
    )
    stack.launch()
    try:
        reference = load_bundle(BundleConfig(max_len=MAX_LEN))  # loads while the services do
        stack.wait_ready()
        yield Served(stack, stack.write_state(tmp / "state.json"), reference)
    finally:
        stack.stop()
    assert all(p.poll() is not None for p in stack.processes.values())
    assert not (tmp / "state.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gauge(url: str, name: str) -> float:
    """The sum over labels of one series on a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name]
    assert values, f"{name} not on {url}"
    return sum(values)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_a_warm_stack_serves_its_first_greedy_requests_without_compiling(served: Served) -> None:
    """The stack started warm (ServeStack's default: --compile-at-start): greedy requests of both lengths of prompt,
    primary-only and speculative, compile nothing in either model service, and a chat's first request reuses the
    chat template's preamble, prefilled at start-up."""
    urls = served.stack.metrics_urls
    counters = [(urls[s], f"tandem_{s}_compiled_programs") for s in ("primary", "secondary")]
    before = [_gauge(*c) for c in counters]
    hits = (urls["primary"], "tandem_primary_prefix_hits")
    reused = _gauge(*hits)
    with TandemClient(served.target, timeout_s=120) as client:
        assert list(client.generate([{"role": "user", "content": PROMPTS[1]}], mode="primary", max_tokens=4))
    assert _gauge(*hits) == reused + 1
    assert before[0] > 0 and before[1] > 0
    assert 0 < _gauge(urls["primary"], "tandem_primary_memory_maps") < 32_765  # half the default vm.max_map_count
    with TandemClient(served.target, timeout_s=120) as client:
        for mode in ("primary", "tandem-speed"):
            for prompt in (PROMPTS[0], PROMPTS[2] * 8):
                assert list(client.generate(prompt, mode=mode, max_tokens=24))
    assert [_gauge(*c) for c in counters] == before


def test_state_file(served: Served) -> None:
    state = json.loads(served.state_file.read_text())
    assert set(state) == {*SERVICES, "pids", "metrics"}
    assert set(state["pids"]) == set(state["metrics"]) == set(SERVICES)
    assert state == served.stack.state()
    for name in SERVICES:
        host, port = state[name].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert _alive(state["pids"][name]), name
        assert health_status(state[name]) == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(state["metrics"][name], timeout=5) as resp:
            assert resp.status == 200
    assert len({state[name] for name in SERVICES}) == 3


def test_greedy_through_orchestrator_matches_in_process(served: Served) -> None:
    tok, engine = served.reference.tokenizer, served.reference.engine
    with TandemClient(served.target, timeout_s=120) as client:
        for prompt in PROMPTS:
            want = engine.generate(tok.encode(prompt), mode="primary", max_tokens=24)
            for mode in ("tandem-speed", "primary"):
                chunks = list(client.generate(prompt, mode=mode, max_tokens=24))  # text in: the orchestrator tokenizes
                got = [t for c in chunks for t in c.token_ids]
                assert got == want.token_ids, (mode, prompt, tok.decode(got), tok.decode(want.token_ids))
                assert chunks[-1].usage.completion_tokens == len(want.token_ids)
                assert chunks[-1].usage.prompt_tokens == len(tok.encode(prompt))
                if mode == "tandem-speed":
                    assert chunks[-1].stats.rounds > 0


def test_stop_string_cuts_text_and_ends_the_request(served: Served) -> None:
    with TandemClient(served.target, timeout_s=120) as client:
        full = "".join(c.text for c in client.generate("The capital of France is", max_tokens=12))
        assert "." in full  # " Paris." then more
        chunks = list(client.generate("The capital of France is", max_tokens=12, stop=["."]))
    assert "".join(c.text for c in chunks) == full[: full.index(".")]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens < 12


def test_cli_generate_json_against_the_stack(served: Served) -> None:
    proc = _run_cli("generate", "The capital of France is", "--target", served.target, "--json", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["text"].startswith(" Paris")
    assert out["prompt"] == "The capital of France is" and out["mode"] == "tandem-speed"
    assert out["finish_reason"] in ("length", "stop") and 1 <= len(out["token_ids"]) <= 8
    tok, engine = served.reference.tokenizer, served.reference.engine
    assert out["token_ids"] == engine.generate(tok.encode(out["prompt"]), mode="primary", max_tokens=8).token_ids
    for key in (
        "rounds",
        "drafted_tokens",
        "accepted_tokens",
        "accepted_per_position",
        "declined_rounds",
        "mean_acceptance_length",
    ):
        assert key in out["stats"]
    assert out["stats"]["output_tokens"] == len(out["token_ids"]) and out["stats"]["tokens_per_s"] > 0


def test_cli_generate_reports_grpc_errors(served: Served) -> None:
    proc = _run_cli("generate", "hello", "--target", served.target, "--max-tokens", "100000")
    assert proc.returncode == 1
    assert proc.stderr.startswith("tandem generate: INVALID_ARGUMENT: "), proc.stderr


def test_cancel_releases_model_service_slots(served: Served) -> None:
    primary = (served.stack.metrics_urls["primary"], "tandem_primary_slots_used")
    secondary = (served.stack.metrics_urls["secondary"], "tandem_secondary_slots_used")
    with TandemClient(served.target) as client:
        call = client.stub.Generate(build_request(PROMPTS[2], max_tokens=200, mode="tandem-speed"))
        next(call), next(call)  # the prefill's token, then a round's: both model services hold the session
        assert _gauge(*primary) == 1 and _gauge(*secondary) == 1
        call.cancel()
        deadline = time.monotonic() + 1.0
        while (_gauge(*primary) or _gauge(*secondary)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gauge(*primary) == 0 and _gauge(*secondary) == 0


def test_a_service_that_dies_while_starting_fails_fast(tmp_path: Path) -> None:
    stack = ServeStack(gguf_path=tmp_path / "missing.gguf", log_dir=tmp_path / "logs", startup_timeout_s=60)
    start = time.monotonic()
    # Any failing exit: an error exit, or a signal (-6: gRPC's poller has aborted the dying process at exit, seen once).
    with pytest.raises(ServeError, match=r"exited with code -?[1-9]") as err:
        stack.start()
    assert time.monotonic() - start < 30
    assert "missing.gguf" in str(err.value)  # the tail of the failing service's log
    assert all(p.poll() is not None for p in stack.processes.values())


def test_killing_the_drafter_process_keeps_the_output(served: Served) -> None:
    """SIGKILL the Secondary process mid-generation: the request (and the next one) still yields exactly the primary's
    greedy tokens. Runs last in this module: the stack has no drafter afterwards."""
    tok, engine = served.reference.tokenizer, served.reference.engine
    prompt = PROMPTS[2]
    want = engine.generate(tok.encode(prompt), mode="primary", max_tokens=48).token_ids
    with TandemClient(served.target, timeout_s=120) as client:
        stream = client.generate(prompt, mode="tandem-speed", max_tokens=48)
        got = list(next(stream).token_ids) + list(next(stream).token_ids)  # the prefill's token, then a round's
        served.stack.processes["secondary"].kill()
        served.stack.processes["secondary"].wait(timeout=10)
        got += [t for c in stream for t in c.token_ids]
        assert got == want
        again = [t for c in client.generate(prompt, mode="tandem-speed", max_tokens=48) for t in c.token_ids]
        assert again == want
    fallbacks = _gauge(served.stack.metrics_urls["orchestrator"], "tandem_drafter_fallbacks_total")
    assert fallbacks == 1  # the next request skipped the Secondary, marked down, instead of failing over again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_service_started_for_a_parent_that_is_gone_stops_itself() -> None:
    """die_with_parent(), the first thing each service runs: a child whose named parent is not its parent (it died
    before the child got going) sends itself SIGTERM; under its real parent it runs on."""
    code = "from tandemrpc.process import die_with_parent; die_with_parent(); print('running')"
    for parent, want in ((os.getpid(), 0), (1, -15)):  # 1: never our pid
        env = {**os.environ, PARENT_ENV: str(parent)}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == want, done.stderr
        assert ("running" in done.stdout) == (want == 0)
