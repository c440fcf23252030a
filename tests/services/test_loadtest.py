"""`tandem loadtest`: the metrics on hand-made chunk timings, the arrival schedule, the Prometheus diff, and runs on a
local Ray instance against a fake orchestrator (rejections, failures, the command line) and the tiny three-service
stack (every request completes with its tokens; server counters equal the responses')."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_services import PROMPTS, Stack

from apps.cli.main import main
from loadtest import (
    LoadTestConfig,
    RequestRecord,
    arrival_gaps,
    metrics_delta,
    ray_session,
    render_markdown,
    render_plot,
    run_loadtest,
    summarize,
    summarize_repeats,
)
from orchestrator.metrics import Metrics
from tandemrpc.launch import free_ports
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc

# -- the metrics, by hand ------------------------------------------------------------------------------------------

# A: 7 tokens in chunks of 1, 4, 2 at 0.1, 0.3, 0.4 s, done at 0.5 s: TPOT (0.5 - 0.1) / 6; ITL 200, 100 ms, per
# token 200/4 = 50 and 100/2 = 50 ms. B: one token (no TPOT, no ITL). C: two single-token chunks, TPOT 200 ms.
RECORDS = [
    RequestRecord(0, "completed", (0.1, 0.3, 0.4), (1, 4, 2), e2el_s=0.5),
    RequestRecord(1, "completed", (0.2,), (1,), e2el_s=0.25),
    RequestRecord(2, "completed", (0.3, 0.5), (1, 1), e2el_s=0.5),
    RequestRecord(4, "failed", (0.1,), (1,), error="UNAVAILABLE: no primary replica"),
    RequestRecord(3, "rejected", error="RESOURCE_EXHAUSTED: the queue is full; retry in 0.5 s"),
    RequestRecord(5, "rejected", error="RESOURCE_EXHAUSTED: the queue is full; retry in 0.5 s"),
]


def test_summary_by_hand() -> None:
    s = summarize(RECORDS, duration_s=2.0)
    assert (s["completed"], s["rejected"], s["failed"]) == (3, 2, 1)
    assert s["errors"] == ["RESOURCE_EXHAUSTED: the queue is full; retry in 0.5 s", "UNAVAILABLE: no primary replica"]
    assert s["total_output_tokens"] == 10  # completed requests only
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 5.0
    assert s["goodput"] is None  # no SLO given
    approx = pytest.approx
    assert s["ttft"] == {"mean": approx(200), "p50": approx(200), "p90": approx(280), "p99": approx(298), "n": 3}
    a, c = 400 / 6, 200.0  # the TPOTs of A and C (ms)
    assert s["tpot"]["n"] == 2 and s["tpot"]["mean"] == approx((a + c) / 2) == s["tpot"]["p50"]
    assert s["tpot"]["p90"] == approx(a + 0.9 * (c - a)) and s["tpot"]["p99"] == approx(a + 0.99 * (c - a))
    assert s["itl"]["n"] == 3 and s["itl"]["mean"] == approx(500 / 3) and s["itl"]["p50"] == approx(200)
    per_token = {"mean": approx(100), "p50": approx(50), "p90": approx(170), "p99": approx(197), "n": 3}
    assert s["itl_per_token"] == per_token  # gaps 200/4, 100/2 (A) and 200/1 (C) ms
    assert s["e2el"]["mean"] == approx(1250 / 3) and s["e2el"]["p50"] == approx(500)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    # TTFT 100 / 200 / 300 ms; TPOT 66.7 ms / none (one token: meets any TPOT SLO) / 200 ms
    assert summarize(RECORDS, 2.0, slo_ttft_ms=250)["goodput"] == 1.0  # A, B
    assert summarize(RECORDS, 2.0, slo_ttft_ms=250, slo_tpot_ms=100)["goodput"] == 1.0  # A, B
    assert summarize(RECORDS, 2.0, slo_tpot_ms=50)["goodput"] == 0.5  # B only
    assert summarize(RECORDS, 2.0, slo_ttft_ms=1000, slo_tpot_ms=1000)["goodput"] == 1.5  # every completed one


def test_summary_of_nothing_and_bad_records() -> None:
    s = summarize([RequestRecord(0, "rejected", error="RESOURCE_EXHAUSTED: full")], duration_s=0.0)
    assert s["completed"] == 0 and s["request_throughput"] is None
    assert s["ttft"] == {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    with pytest.raises(ValueError, match="outcome"):
        RequestRecord(0, "timeout")
    with pytest.raises(ValueError, match="same length"):
        RequestRecord(0, "completed", (0.1,), ())


def test_arrival_gaps() -> None:
    assert arrival_gaps(5, rate=0.0) == [0.0] * 5
    poisson = arrival_gaps(20_000, rate=4.0, burstiness=1.0, seed=1)
    assert statistics.fmean(poisson) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(poisson) / statistics.fmean(poisson) == pytest.approx(1.0, rel=0.05)  # exponential
    steady = arrival_gaps(20_000, rate=4.0, burstiness=4.0, seed=1)
    assert statistics.fmean(steady) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(steady) / statistics.fmean(steady) == pytest.approx(0.5, rel=0.05)  # 1 / sqrt(shape)
    assert arrival_gaps(10, 2.0, seed=3) == arrival_gaps(10, 2.0, seed=3) != arrival_gaps(10, 2.0, seed=4)


def test_metrics_delta_from_the_orchestrators_counters() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)  # the orchestrator's own series
    m.drafts.inc(5)
    m.accepted_per_pos.labels(position="0").inc(3)
    before = generate_latest(registry).decode()
    m.drafts.inc(10)
    m.draft_tokens.inc(30)
    m.accepted_tokens.inc(18)
    for pos, n in enumerate((8, 6, 4)):
        m.accepted_per_pos.labels(position=str(pos)).inc(n)
    m.drafter_fallbacks.inc()
    m.speculation_skipped.inc(2)
    m.load_shed.inc(3)
    delta = metrics_delta(before, generate_latest(registry).decode())
    spec = delta["spec"]
    assert (spec["drafts"], spec["draft_tokens"], spec["accepted_tokens"]) == (10, 30, 18)
    assert spec["acceptance_rate"] == pytest.approx(0.6) and spec["mean_acceptance_length"] == pytest.approx(2.8)
    assert spec["accepted_per_position"] == [8, 6, 4]
    assert spec["acceptance_per_position"] == pytest.approx([0.8, 0.6, 0.4])
    assert delta["server_counters"] == {"drafter_fallbacks": 1, "failovers": 0}
    assert delta["primary_only"] == {"load_shed": 3, "speculation_skipped": 2}
    assert metrics_delta(before, before)["spec"]["acceptance_rate"] is None


def test_config_checks_and_run_order() -> None:
    cfg = LoadTestConfig(modes=("primary", "tandem-speed"), sweep=(1, 4))
    assert cfg.is_sweep
    assert cfg.points() == [("primary", 1), ("tandem-speed", 1), ("primary", 4), ("tandem-speed", 4)]
    assert LoadTestConfig(num_requests=7).points() == [("tandem-speed", 7)]  # no limit: every request at once
    twice = LoadTestConfig(modes=("primary", "tandem-speed"), sweep=(1, 4), repeats=2)
    assert twice.points() == cfg.points()  # warm-up once per mode and concurrency
    assert [(m[0], c, r) for m, c, r in twice.schedule()] == [
        ("p", 1, 0), ("t", 1, 0), ("t", 1, 1), ("p", 1, 1), ("p", 4, 0), ("t", 4, 0), ("t", 4, 1), ("p", 4, 1),
    ]  # fmt: skip
    assert LoadTestConfig(repeats=3).is_sweep
    for bad in (
        dict(modes=("fast",)),
        dict(rate=-1.0),
        dict(burstiness=0.0),
        dict(sweep=(1, 0)),
        dict(sweep=(2,), max_concurrency=2),
        dict(slo_tpot_ms=0.0),
        dict(num_requests=0),
        dict(repeats=0),
    ):
        with pytest.raises(ValueError):
            LoadTestConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(SystemExit, match="--sweep takes whole numbers"):
        main(["loadtest", "--prompts", "x.jsonl", "--json", "x.json", "--sweep", "1,x"])


# -- runs on Ray --------------------------------------------------------------------------------------------------


class FakeOrchestrator(pb_grpc.OrchestratorServicer):
    """Answers by the prompt's text: "full" → RESOURCE_EXHAUSTED, "boom" → INTERNAL, "cut" → a stream without its
    final chunk; anything else → tokens [1] and [2, 3] in two chunks, then the final chunk (one round, 2 of 2
    drafts accepted)."""

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):  # noqa: N802
        text = request.chat.messages[0].content if request.HasField("chat") else request.text
        if text == "full":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full; retry in 0.5 s")
        if text == "boom":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        yield pb.GenerateResponse(token_ids=[1], text="a")
        if text == "cut":
            return
        yield pb.GenerateResponse(token_ids=[2, 3], text="bc")
        stats = pb.SpeculationStats(rounds=1, drafted_tokens=2, accepted_tokens=2, accepted_per_position=[1, 1])
        usage = pb.Usage(prompt_tokens=4, completion_tokens=3)
        yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH, usage=usage, stats=stats)


class _FlakyRay:
    """Stands in for the ray module: its first `failures` local starts time out as Ray's node start can."""

    def __init__(self, failures: int, error: str = "The current node timed out during startup. ...") -> None:
        self.failures, self.error = failures, error
        self.inits = self.shutdowns = 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **_: object) -> None:
        self.inits += 1
        if self.inits <= self.failures:
            raise Exception(self.error)  # what Ray raises

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_local_ray_start_that_times_out_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest import harness

    flaky = _FlakyRay(failures=1)
    monkeypatch.setattr(harness, "_ray", lambda: flaky)
    with ray_session(log=lambda _: None) as ray:
        assert ray is flaky and flaky.inits == 2
    assert flaky.shutdowns == 2  # after the failed start, and at the end
    for failing in (_FlakyRay(failures=2), _FlakyRay(failures=1, error="some other failure")):
        monkeypatch.setattr(harness, "_ray", lambda f=failing: f)
        with pytest.raises(Exception, match=r"timed out|other failure"), ray_session(log=lambda _: None):
            pass
        assert failing.inits == (2 if failing.failures == 2 else 1)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the module, which the harness reuses.

    Started by `ray start --head --block` in a fresh process, not by `ray.init` here: Ray starts its daemons with a
    `preexec_fn` (a fork that runs Python before exec), and in this process, where earlier tests left JAX's and
    gRPC's threads, that child could hang before exec (its locks copied mid-use), so the raylet never came up. CI lost
    the module to "The current node timed out during startup" twice in a row. `tandem loadtest` itself loads no JAX.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    (port,) = free_ports(1)
    ray_cli = Path(sys.executable).with_name("ray")
    args = ["start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    args += [f"--object-store-memory={128 * 2**20}", "--disable-usage-stats"]
    head = subprocess.Popen([str(ray_cli), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        with contextlib.ExitStack() as session:
            deadline = time.monotonic() + 120
            while True:
                try:
                    session.enter_context(ray_session(address=f"127.0.0.1:{port}"))
                    break
                except Exception:  # the head is not up yet
                    assert head.poll() is None and time.monotonic() < deadline, "the local Ray head did not start"
                    time.sleep(1)
            yield
    finally:
        head.terminate()  # `ray start --block` stops the daemons it started
        head.wait(60)


@pytest.fixture(scope="module")
def fake_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_OrchestratorServicer_to_server(FakeOrchestrator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_rejected_and_failed_requests_are_counted_not_retried(ray_local: None, fake_target: str, tmp_path) -> None:
    prompts = ["ok", "full", "ok", "boom", "cut"]
    cfg = LoadTestConfig(num_requests=10, max_concurrency=3, modes=("primary",), warmup_requests=0, max_tokens=3)
    report = run_loadtest(cfg, prompts, target=fake_target, progress=False, log=lambda _: None)
    assert (report["completed"], report["rejected"], report["failed"]) == (4, 2, 4)
    assert report["errors"] == [
        "RESOURCE_EXHAUSTED: the queue is full; retry in 0.5 s",
        "INTERNAL: boom",
        "the stream ended without its final chunk",
    ]
    assert report["total_output_tokens"] == 12 and report["itl"]["n"] == 4 and report["tpot"]["n"] == 4
    assert [r["outcome"] for r in report["requests"]] == ["completed", "rejected", "completed", "failed", "failed"] * 2
    spec = report["spec_responses"]
    assert (spec["drafts"], spec["accepted_tokens"], spec["mean_acceptance_length"]) == (4, 8, 3.0)
    assert report["spec"] is None and report["target"] == fake_target and report["server"] == "given"
    text = render_markdown(report)
    assert "| primary | 3 | 4 | 2 | 4 |" in text and "> primary at 3: INTERNAL: boom" in text
    assert render_plot(report, tmp_path / "cdf.png").stat().st_size > 0  # the single run's CDFs


def test_summary_of_repeats_is_the_median_and_the_paired_ratio() -> None:
    def run(mode: str, c: int, repeat: int, tok_s: float, p99: float | None) -> dict:
        return {"mode": mode, "max_concurrency": c, "repeat": repeat, "output_throughput": tok_s, "tpot": {"p99": p99}}

    runs = [run("primary", 1, 0, 10.0, 50.0), run("tandem-speed", 1, 0, 12.0, 40.0),
            run("tandem-speed", 1, 1, 30.0, None), run("primary", 1, 1, 20.0, 60.0),
            run("primary", 1, 2, 40.0, 70.0), run("tandem-speed", 1, 2, 36.0, 45.0),
            run("primary", 8, 0, 20.0, 90.0)]  # fmt: skip
    summary = summarize_repeats(runs, ("primary", "tandem-speed"))
    assert [(r["max_concurrency"], r["mode"], r["runs"]) for r in summary] == [
        (1, "primary", 3), (1, "tandem-speed", 3), (8, "primary", 1)
    ]  # fmt: skip
    p1, t1, p8 = summary
    assert (p1["output_throughput"], p1["tpot_p99"], p1["ratio_to_first"]) == (20.0, 60.0, None)
    assert (t1["output_throughput"], t1["tpot_p99"]) == (30.0, 42.5)  # the run without a p99 is left out of it
    # per repeat 1.2, 1.5, 0.9: the median of the pairs, not 30 / 20 (the medians' ratio)
    assert t1["ratio_to_first"] == pytest.approx(1.2) and t1["output_throughputs"] == [12.0, 30.0, 36.0]
    assert p8["ratio_to_first"] is None


def test_command_line_sweep(ray_local: None, fake_target: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok", "category": "chat"}\n{"prompt": "full"}\n')
    out, md, png = tmp_path / "lt.json", tmp_path / "lt.md", tmp_path / "lt.png"
    argv = ["loadtest", "--target", fake_target, "--prompts", str(prompts), "--num-requests", "4", "--rate", "200"]
    argv += ["--mode", "primary,tandem-speed", "--sweep", "1,2", "--slo-ttft-ms", "10000", "--json", str(out)]
    argv += ["--markdown", str(md), "--plot", str(png), "--no-progress", "--warmup", "0", "--users", "1"]
    assert main([*argv, "--repeats", "2"]) == 0
    report = json.loads(out.read_text())
    runs = report["sweep"]
    assert [(r["mode"], r["max_concurrency"], r["repeat"]) for r in runs] == [
        ("primary", 1, 0), ("tandem-speed", 1, 0), ("tandem-speed", 1, 1), ("primary", 1, 1),
        ("primary", 2, 0), ("tandem-speed", 2, 0), ("tandem-speed", 2, 1), ("primary", 2, 1),
    ]  # fmt: skip
    assert [(r["mode"], r["max_concurrency"], r["runs"]) for r in report["summary"]] == [
        ("primary", 1, 2), ("tandem-speed", 1, 2), ("primary", 2, 2), ("tandem-speed", 2, 2),
    ]  # fmt: skip
    for r in runs:
        assert (r["completed"], r["rejected"], r["failed"]) == (2, 2, 0)
        assert r["goodput"] == pytest.approx(r["request_throughput"])  # every completed request meets a 10 s TTFT
        assert r["output_throughput"] == pytest.approx(3 * r["request_throughput"])
    assert report["config"]["rate"] == 200 and report["args"]["prompts"] == str(prompts)
    assert "| tandem-speed | 2 | 2 | 2 | 0 |" in md.read_text() and png.stat().st_size > 0
    assert "| 2 | tandem-speed | 2 |" in md.read_text()  # the summary's row


@pytest.fixture(scope="module")
def tiny_stack(tiny_params) -> Iterator[Stack]:
    s = Stack(tiny_params)
    yield s
    s.close()


def test_end_to_end_on_the_tiny_stack(ray_local: None, tiny_stack: Stack) -> None:
    cfg = LoadTestConfig(num_requests=6, max_concurrency=2, rate=50.0, max_tokens=16)  # warm-up: 2 requests
    metrics_url = f"http://127.0.0.1:{tiny_stack.orchestrator.metrics_port}/metrics"
    models = [f"http://127.0.0.1:{s.metrics_port}/metrics" for s in (tiny_stack.primary, tiny_stack.secondary)]
    run = run_loadtest(
        cfg,
        PROMPTS,
        target=tiny_stack.orchestrator.address,
        metrics_url=metrics_url,
        service_metrics=models,
        progress=False,
        log=print,
    )
    assert run["compiled_during_run"] is not None and run["compiled_during_run"] >= 0
    assert run["mode"] == "tandem-speed" and run["max_concurrency"] == 2 and "sweep" not in run
    assert (run["completed"], run["rejected"], run["failed"]) == (6, 0, 0), run["errors"]
    assert run["total_output_tokens"] == 6 * 16 and [r["output_tokens"] for r in run["requests"]] == [16] * 6
    assert 0 < run["ttft"]["p50"] <= run["e2el"]["p50"] and run["tpot"]["n"] == 6 and run["itl"]["n"] >= 6
    server, client = run["spec"], run["spec_responses"]
    assert server["drafts"] > 0 and server["accepted_per_position"]
    for key in ("drafts", "draft_tokens", "accepted_tokens", "acceptance_rate", "mean_acceptance_length"):
        assert server[key] == pytest.approx(client[key]), key  # the orchestrator counted exactly these requests
    assert _strip(server["accepted_per_position"]) == _strip(client["accepted_per_position"])
    assert run["server_counters"] == {"drafter_fallbacks": 0, "failovers": 0}
    shed = run["primary_only"]["load_shed"]  # requests that met another one on the primary
    assert run["primary_only"] == {"load_shed": shed, "speculation_skipped": 0}  # the Stack's payoff is off
    assert f"| {shed:g} / 0 |" in render_markdown(run)
    assert tiny_stack.settled_sessions() == 0


def _strip(counts: list[float]) -> list[float]:
    while counts and counts[-1] == 0:
        counts = counts[:-1]
    return counts
