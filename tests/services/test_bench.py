"""`tandem bench`: the metrics on hand-made samples, the report and its markdown, and short end-to-end runs over the
tiny engine in process and through the in-process gRPC stack."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import SPECULATE_ALWAYS, TINY, make_engine

from apps.cli.main import build_parser, main
from benchmark.backends import PeerResult
from benchmark.config import BenchConfig
from benchmark.prompts import BenchPrompt, read_prompts
from benchmark.report import SCHEMA, build_report, identity_warnings, render_markdown
from benchmark.run import run
from benchmark.stats import (
    Sample,
    block_cost_ratios,
    first_difference,
    mean,
    median,
    microservice_tax,
    mismatches,
    percentile,
    speedups,
    summarize,
)
from orchestrator.config import OrchestratorConfig
from orchestrator.server import OrchestratorServiceConfig
from orchestrator.server import build_server as build_orchestrator
from primary_svc.server import PrimaryServiceConfig
from primary_svc.server import build_server as build_primary
from secondary_svc.server import SecondaryServiceConfig
from secondary_svc.server import build_server as build_secondary
from tandem.config import SpecConfig
from tandem.decoding.engine import Engine
from tandem.decoding.workers import DrafterWorker, PrimaryWorker

REPO = Path(__file__).parents[2]
FIXTURE = REPO / "tests" / "data" / "bench_report.json"


# -- metrics on hand-made inputs ---------------------------------------------------------------------------------


def test_ttft_tpot_and_throughput_of_a_sample() -> None:
    s = Sample(token_ids=(5, 6, 7, 8, 9), ttft_s=0.2, e2el_s=1.0)
    assert s.output_tokens == 5
    assert s.tokens_per_s == pytest.approx(5.0)
    # docs/design.md, Metric definitions: TPOT = (E2EL - TTFT) / (output tokens - 1)
    assert s.tpot_s == pytest.approx((1.0 - 0.2) / 4)
    assert Sample(token_ids=(5,), ttft_s=0.2, e2el_s=0.3).tpot_s is None  # needs > 1 output token
    assert Sample(token_ids=(), ttft_s=None, e2el_s=0.3).tpot_s is None
    assert Sample(token_ids=(1,), ttft_s=0.1, e2el_s=0.0).tokens_per_s == 0.0


def test_median_mean_and_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 12):
        xs = rng.random(n).tolist()
        assert median(xs) == pytest.approx(float(np.median(xs)))
        assert mean(xs) == pytest.approx(float(np.mean(xs)))
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert median([]) is None and percentile([], 90) is None and mean([]) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _spec(ids: Sequence[int], e2el: float, rounds: int, drafted: int, accepted: int, per_pos: Sequence[int]) -> Sample:
    return Sample(
        token_ids=tuple(ids),
        ttft_s=0.1,
        e2el_s=e2el,
        rounds=rounds,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        accepted_per_position=tuple(per_pos),
        primary_calls=rounds + 1,
        drafter_calls=rounds,
    )


def test_summary_pools_speculation_counters_over_prompts() -> None:
    a = _spec(range(9), e2el=1.0, rounds=4, drafted=12, accepted=4, per_pos=[3, 1])  # 1 + 4 (1 + accepted) tokens
    b = _spec(range(11), e2el=2.0, rounds=2, drafted=8, accepted=8, per_pos=[2, 2, 2, 2])
    c = _spec(range(4), e2el=0.5, rounds=1, drafted=4, accepted=2, per_pos=[1, 1])
    s = summarize([[a], [b], [c]])
    assert s["prompts"] == 3 and s["output_tokens"] == 24
    assert s["tokens_per_s"] == pytest.approx(8.0)  # median of 9, 5.5, 8 tok/s
    assert s["rounds"] == 7 and s["drafted_tokens"] == 24 and s["accepted_tokens"] == 14
    assert s["mean_acceptance_length"] == pytest.approx(1 + 14 / 7)  # GenerationStats: 1 + accepted / rounds
    assert s["acceptance_rate"] == pytest.approx(14 / 24)
    assert s["accepted_per_position"] == [6, 4, 2, 2]
    assert s["acceptance_per_position"] == pytest.approx([6 / 7, 4 / 7, 2 / 7, 2 / 7])
    assert s["primary_calls_per_token"] == pytest.approx((5 + 3 + 2) / 24)
    assert s["drafter_calls_per_token"] == pytest.approx(7 / 24)
    assert s["ttft_s_median"] == pytest.approx(0.1)
    assert s["tpot_s_median"] == pytest.approx(0.4 / 3)  # of 0.9/8, 1.9/10, 0.4/3
    assert s["outputs"] == [list(range(9)), list(range(11)), list(range(4))]
    assert s["deterministic"]
    assert s["lookup_rounds"] is None  # the samples do not report prompt lookup
    # Prompt lookup's share of the counters pools like them; the markdown gets a table of it.
    looked = [
        dataclasses.replace(x, lookup_rounds=n, lookup_drafted_tokens=3 * n, lookup_accepted_tokens=2 * n)
        for x, n in ((a, 1), (b, 1), (c, 0))
    ]
    s = summarize([[x] for x in looked])
    assert (s["lookup_rounds"], s["lookup_drafted_tokens"]) == (2, 6) and s["lookup_accepted_tokens"] == 4
    report = {"modes": {"speed@0:0:4:0:3": s}, "results": {"in-process": {"speed@0:0:4:0:3": s}}}
    assert "| speed@0:0:4:0:3 | in-process | 2 | 29% | 3.00 | 67% |" in render_markdown(report)


def test_summary_without_speculation_and_with_repeats() -> None:
    fast = Sample(token_ids=(1, 2, 3), ttft_s=0.1, e2el_s=1.0, primary_calls=3, drafter_calls=0, rounds=0)
    slow = dataclasses.replace(fast, ttft_s=0.3, e2el_s=3.0)
    other = dataclasses.replace(fast, token_ids=(1, 2, 4), e2el_s=2.0)
    s = summarize([[fast, slow, other]])
    assert s["per_prompt"][0]["e2el_s"] == pytest.approx(2.0)  # median over repeats
    assert s["ttft_s_median"] == pytest.approx(0.1)
    assert s["outputs"] == [[1, 2, 3]]
    assert not s["deterministic"]  # a repeat gave other tokens
    assert s["mean_acceptance_length"] is None and s["acceptance_rate"] is None and s["acceptance_per_position"] == []
    peer = Sample(token_ids=(1, 2), ttft_s=0.1, e2el_s=1.0, drafter_calls=3)  # counters a peer does not report
    p = summarize([[peer]])
    assert p["rounds"] is None and p["primary_calls_per_token"] is None
    assert p["drafter_calls_per_token"] == pytest.approx(1.5)


def test_speedup_tax_identity_and_block_cost() -> None:
    assert speedups({"primary": 10.0, "speed": 15.0, "tandem-speed": None}) == {
        "primary": 1.0,
        "speed": 1.5,
        "tandem-speed": None,
    }
    assert speedups({"speed": 15.0}) == {"speed": None}  # no baseline
    assert microservice_tax({"primary": 10.0, "speed": 12.0}, {"primary": 8.0}) == {"primary": 1.25}
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2  # a shorter output differs too
    ref = [[1, 2, 3], [4, 5, 6]]
    assert mismatches(ref, [[1, 2, 3], [4, 5, 6]]) == []
    assert mismatches(ref, [[1, 2, 3], [4, 9, 6]]) == [{"prompt": 1, "position": 1, "expected": 5, "got": 9}]
    assert mismatches(ref, [[1, 2], [4, 5, 6]]) == [{"prompt": 0, "position": 2, "expected": 3, "got": None}]
    with pytest.raises(ValueError):
        mismatches(ref, [[1, 2, 3]])
    assert block_cost_ratios({2: 3.0, 1: 2.0, 4: 5.0}) == {1: 1.0, 2: 1.5, 4: 2.5}
    with pytest.raises(ValueError):
        block_cost_ratios({2: 3.0})


def _samples(outputs: dict[tuple[str, str], list[list[int]]], tps: dict[tuple[str, str], float]):
    return {
        key: [[Sample(tuple(ids), 0.05, len(ids) / tps[key], rounds=0 if key[1] == "primary" else 2)] for ids in outs]
        for key, outs in outputs.items()
    }


def test_report_flags_a_mode_that_is_not_lossless() -> None:
    cfg = BenchConfig(modes=("primary", "speed", "tandem-speed"), vias=("in-process", "grpc"), max_tokens=3)
    prompts = [BenchPrompt("a", "chat", (1, 2)), BenchPrompt("b", "code", (3,))]
    good, bad = [[7, 8, 9], [4, 5, 6]], [[7, 8, 9], [4, 0, 6]]
    outputs = {
        ("in-process", "primary"): good,
        ("grpc", "primary"): good,
        ("in-process", "speed"): good,
        ("grpc", "speed"): bad,  # one token differs through gRPC only
        ("in-process", "tandem-speed"): good,
        ("grpc", "tandem-speed"): good,
    }
    tps = {("in-process", "primary"): 10.0, ("grpc", "primary"): 8.0, ("in-process", "speed"): 20.0}
    tps |= {("grpc", "speed"): 12.0, ("in-process", "tandem-speed"): 30.0, ("grpc", "tandem-speed"): 24.0}
    report = build_report(cfg, prompts, _samples(outputs, tps), block_ms={1: 2.0, 2: 2.5})
    assert report["identical"] == {"primary": True, "speed": False, "tandem-speed": True}
    assert report["mismatches"]["speed"] == [{"via": "grpc", "prompt": 1, "position": 1, "expected": 5, "got": 0}]
    assert report["consistent_across_vias"] == {"primary": True, "speed": False, "tandem-speed": True}
    assert report["modes"]["speed"]["via"] == "grpc"  # the headline figures are gRPC's
    assert report["modes"]["tandem-speed"]["tokens_per_s"] == pytest.approx(24.0)
    assert report["in_process"]["tandem-speed"]["tokens_per_s"] == pytest.approx(30.0)
    assert report["speedup"] == pytest.approx({"primary": 1.0, "speed": 1.5, "tandem-speed": 3.0})
    assert report["speedup_by_via"]["in-process"]["tandem-speed"] == pytest.approx(3.0)
    assert report["tax"] == pytest.approx({"primary": 1.25, "speed": 20 / 12, "tandem-speed": 1.25})
    assert report["block_cost"] == {"1": 1.0, "2": 1.25} and report["block_cost_ms"] == {"1": 2.0, "2": 2.5}
    warnings = identity_warnings(report)
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: speed is NOT identical")
    assert "prompt 2 (grpc) at token 1 (primary 5, speed 0)" in warnings[0]
    assert "1/2 prompts, the earliest from token 1:" in warnings[0]
    assert "**✗**" in render_markdown(report)
    json.dumps(report)  # JSON-able as it is


def test_standalone_tandem_differing_is_a_note_not_a_warning() -> None:
    cfg = BenchConfig(modes=("primary", "tandem"), vias=("in-process",), max_tokens=2)
    outputs = {("in-process", "primary"): [[1, 2]], ("in-process", "tandem"): [[1, 3]]}
    tps = {("in-process", "primary"): 1.0, ("in-process", "tandem"): 2.0}
    report = build_report(cfg, [BenchPrompt("a", "", (1,))], _samples(outputs, tps))
    assert report["identical"] == {"primary": True, "tandem": False}
    assert report["tax"] == {} and "consistent_across_vias" not in report and report["block_cost"] is None
    assert identity_warnings(report) == ["note: tandem (standalone, unverified by design) differs from primary on 1/1"]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="primary"):
        BenchConfig(modes=("speed",))
    with pytest.raises(ValueError, match="unknown mode"):
        BenchConfig(modes=("primary", "turbo"))
    with pytest.raises(ValueError, match="vias"):
        BenchConfig(vias=("carrier-pigeon",))
    with pytest.raises(ValueError, match="gamma_max"):
        BenchConfig(gamma_max=0)
    with pytest.raises(ValueError, match="in-process"):
        BenchConfig(vias=("grpc",), peers=("hf",))
    with pytest.raises(ValueError, match="TAU_FIRST:TAU:GAMMA_MAX"):
        BenchConfig(modes=("primary", "speed@0.5:3"))
    with pytest.raises(ValueError, match="gamma_max"):
        BenchConfig(modes=("primary", "speed@0.5:0.5:0"))
    with pytest.raises(ValueError, match="unknown mode"):
        BenchConfig(modes=("primary", "turbo@0:0.8:7"))
    with pytest.raises(ValueError, match="prefix_cache_rows"):
        BenchConfig(prefix_cache_rows=-1)
    assert BenchConfig().prefix_cache_rows == 0  # modes follow one another on each prompt: none reuses another's
    arms = BenchConfig(modes=("primary", "tandem-speed", "tandem-speed@0:0.8:7"), gamma_max=2, tau=0.3)
    assert arms.spec_of("tandem-speed") == SpecConfig(gamma_max=2, tau=0.3)
    assert arms.spec_of("tandem-speed@0:0.8:7") == SpecConfig(gamma_max=7, tau=0.8, tau_first=0.0)
    # The optional 4th and 5th settings: min_accepted, then prompt lookup's shortest n-gram.
    lookup = BenchConfig(modes=("primary", "tandem-speed@0:0.8:4:0:3", "speed@0:0.8:4:1.5"), lookup_ngram=2)
    assert lookup.spec_of("tandem-speed@0:0.8:4:0:3") == SpecConfig(gamma_max=4, tau=0.8, lookup_ngram=3)
    assert lookup.spec_of("speed@0:0.8:4:1.5") == SpecConfig(gamma_max=4, tau=0.8, min_accepted=1.5)
    assert lookup.spec.lookup_ngram == 2
    with pytest.raises(ValueError, match="lookup_ngram"):
        BenchConfig(modes=("primary", "speed@0:0.8:4:0:-1"))
    with pytest.raises(ValueError, match="three to five values"):
        BenchConfig(modes=("primary", "speed@0:0.8:4:0:3:1"))
    cfg = BenchConfig(modes=("primary",), peers=("hf",))
    assert cfg.all_modes == ("primary", "hf", "hf-assisted") and cfg.vias_of("hf") == ("in-process",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_tokens = 3  # type: ignore[misc]


def test_read_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "category": "chat"}\n\n{"prompt": "yo"}\n{"prompt": "x"}\n')
    assert read_prompts(path) == [("hi", "chat"), ("yo", ""), ("x", "")]
    assert read_prompts(path, limit=2) == [("hi", "chat"), ("yo", "")]
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_prompts(path)


def test_the_shipped_prompt_set() -> None:
    rows = read_prompts(REPO / "prompts" / "bench.jsonl")
    assert len(rows) == 12 and len({p for p, _ in rows}) == 12
    assert sorted(c for _, c in rows) == sorted(["chat", "story", "code", "facts"] * 3)


# -- rendering -----------------------------------------------------------------------------------------------------


def test_markdown_of_the_fixture() -> None:
    report = json.loads(FIXTURE.read_text())
    text = render_markdown(report)
    lines = text.splitlines()
    assert "| mode | via | tok/s | speedup |" in text
    row = next(line for line in lines if line.startswith("| tandem-speed | grpc |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "21.0" and cells[3] == "2.50×" and cells[6] == "2.50" and cells[7] == "75%" and cells[-1] == "✓"
    assert "| tandem-speed | 25.0 | 21.0 | 1.19× |" in text  # the microservice tax table
    assert "| ms | 40.0 | 44.0 | 52.0 | 60.0 |" in text and "| ÷ k=1 | 1.00 | 1.10 | 1.30 | 1.50 |" in text
    assert "| tandem | 2.00 | 0.050 |" in text  # drafter step
    assert "| tandem-speed | grpc | 1.00 | 0.50 |" in text  # acceptance per position
    assert "Intel(R) Xeon(R) Test CPU" in text and "WARNING" not in text


def test_bench_report_command_writes_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert main(["bench-report", str(FIXTURE), "--markdown", str(md), "--plot", str(png)]) == 0
    assert md.read_text() == render_markdown(json.loads(FIXTURE.read_text()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["bench-report", str(FIXTURE)]) == 0
    assert "| mode | via | tok/s |" in capsys.readouterr().out


def test_bench_command_line_parses() -> None:
    args = build_parser().parse_args(
        ["bench", "--prompts", "p.jsonl", "--max-tokens", "16", "--json", "o.json", "--via", "grpc", "--limit", "2"]
    )
    assert args.command == "bench" and args.via == "grpc" and args.limit == 2 and args.modes.split(",")[0] == "primary"
    with pytest.raises(SystemExit, match="--target needs"):
        main(
            ["bench", "--prompts", "prompts/bench.jsonl", "--json", "o.json", "--via", "in-process", "--target", "x:1"]
        )
    with pytest.raises(SystemExit, match="must include 'primary'"):
        main(["bench", "--prompts", "prompts/bench.jsonl", "--json", "o.json", "--modes", "speed"])
    with pytest.raises(SystemExit, match="describe a --target"):
        main(["bench", "--prompts", "prompts/bench.jsonl", "--json", "o.json", "--service-metrics", "http://x:1/m"])
    args = build_parser().parse_args(
        ["bench", "--prompts", "p", "--json", "o", "--target", "h:1", "--service-metrics", "http://a/m,http://b/m"]
    )
    assert args.service_metrics == "http://a/m,http://b/m" and args.metrics_url is None


# -- end to end over the tiny models ----------------------------------------------------------------------------


# Prompts of 3-4 tokens, 8 new tokens and γ_max = 3 keep every block within 4 tokens and every context within 16
# slots: few compiled shapes (each costs a second or two), all of them compiled by the warm-up.
PROMPTS = [BenchPrompt("one", "chat", (3, 17, 9)), BenchPrompt("two", "code", (40, 2, 11, 5))]
TOKENS = 8


@pytest.fixture(scope="module")
def engine(tiny_params) -> Engine:
    return make_engine(tiny_params)


class Stack:
    """Primary, Secondary and Orchestrator servers in this process around tiny models (as test_services.py).

    The primary has one slot, like `tandem bench`'s own stack, so it runs the shapes the in-process engine has
    compiled already. The drafters keep four: the Secondary releases a finished request's slot asynchronously, and
    the tiny primary's prefill is too quick to be sure the next request finds it free.
    """

    def __init__(self, tiny_params) -> None:
        self.primary_worker = PrimaryWorker(make_engine(tiny_params, slots=1).primary)
        drafters = make_engine(tiny_params, slots=4).drafters
        self.drafters = {
            "tandem": DrafterWorker(drafters["tandem"].runner),
            "vanilla": DrafterWorker(drafters["speed"].runner),
        }
        self.primary = build_primary(self.primary_worker, PrimaryServiceConfig(metrics_port=0)).start()
        self.secondary = build_secondary(self.drafters, SecondaryServiceConfig(metrics_port=0)).start()
        core = OrchestratorConfig(
            payoff=SPECULATE_ALWAYS,
            primary_target=self.primary.address,
            secondary_target=self.secondary.address,
            vocab_size=TINY.vocab_size,
            max_len=256,
        )
        self.orchestrator, self.core = build_orchestrator(OrchestratorServiceConfig(metrics_port=0, core=core), None)
        self.orchestrator.start()

    def settled_sessions(self, within_s: float = 1.0) -> int:
        """Live sessions once releases in flight have landed."""
        deadline = time.monotonic() + within_s
        while self._live() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._live()

    def _live(self) -> int:
        return len(self.primary_worker.pool) + sum(len(w.pool) for w in self.drafters.values())

    def close(self) -> None:
        for s in (self.orchestrator, self.secondary, self.primary):
            s.stop(0)
        self.core.close()


@pytest.fixture(scope="module")
def stack(tiny_params) -> Iterator[Stack]:
    s = Stack(tiny_params)
    yield s
    s.close()


def _check_run(report: dict, modes: Sequence[str], vias: Sequence[str]) -> None:
    assert report["schema"] == SCHEMA and report["vias"] == list(vias)
    for mode in modes:
        m = report["modes"][mode]
        assert m["via"] == vias[-1]
        assert m["tokens_per_s"] > 0 and m["ttft_s_median"] > 0 and m["tpot_s_median"] > 0
        assert len(m["outputs"]) == len(PROMPTS) and all(len(o) == TOKENS for o in m["outputs"])
        assert report["identical"][mode] is True
        assert report["speedup"][mode] > 0
    assert report["modes"]["primary"]["primary_calls_per_token"] == pytest.approx(1.0)
    assert report["modes"]["primary"]["mean_acceptance_length"] is None
    spec = report["modes"]["tandem-speed"]
    assert spec["rounds"] > 0 and 1.0 <= spec["mean_acceptance_length"] <= 1 + 3
    assert spec["drafter_calls_per_token"] == pytest.approx(spec["rounds"] / spec["output_tokens"])
    assert spec["primary_calls_per_token"] == pytest.approx((spec["rounds"] + len(PROMPTS)) / spec["output_tokens"])
    assert {"cpu", "cpu_count", "ram_gib", "python", "jax", "date", "git_commit"} <= set(report["machine"])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one): the report names its commit
        assert report["machine"]["git_commit"] == head.stdout.strip()
    json.dumps(report)


def test_run_in_process_over_the_tiny_engine(engine: Engine) -> None:
    cfg = BenchConfig(
        modes=("primary", "tandem-speed", "tandem-speed@0:0:1"),
        vias=("in-process",),
        max_tokens=TOKENS,
        gamma_max=3,
        tau=0.0,
        block_cost_context=0,
        block_cost_max_k=2,
        block_cost_calls=1,
    )
    lines: list[str] = []
    report = run(cfg, PROMPTS, engine=engine, log=lines.append)
    _check_run(report, cfg.modes, cfg.vias)
    assert report["args"]["max_tokens"] == TOKENS  # the config, without a command line
    assert [line.split(": ")[0] for line in lines[3:9]] == [
        "[1/6] prompt 1 primary (in-process)",
        "[2/6] prompt 1 tandem-speed (in-process)",
        "[3/6] prompt 1 tandem-speed@0:0:1 (in-process)",
        "[4/6] prompt 2 tandem-speed@0:0:1 (in-process)",
        "[5/6] prompt 2 tandem-speed (in-process)",
        "[6/6] prompt 2 primary (in-process)",
    ]  # interleaved, A B B A: each mode in turn on each prompt, after one warm-up per mode
    arm = report["modes"]["tandem-speed@0:0:1"]  # its own settings: one draft in every round (τ = 0)
    assert arm["drafted_tokens"] == arm["rounds"] and arm["mean_acceptance_length"] <= 2.0
    spec = report["modes"]["tandem-speed"]  # the run's settings: γ_max = 3, τ = 0
    assert spec["drafted_tokens"] > spec["rounds"]
    assert list(report["block_cost"]) == ["1", "2"] and report["block_cost"]["1"] == 1.0
    assert report["block_cost_context"] == 0 and set(report["block_cost_ms"]) == {"1", "2"}
    assert set(report["drafter_step_ms"]) == {"tandem", "vanilla"}
    assert all(engine.primary.lengths == 0)  # the block-cost calls left the cache slot empty


def test_run_in_process_and_through_grpc(engine: Engine, stack: Stack) -> None:
    declining = "tandem-speed@1:0.5:3"  # no draft is that sure: the router declines every round
    cfg = BenchConfig(
        modes=("primary", "tandem-speed", declining),
        max_tokens=TOKENS,
        gamma_max=3,
        tau=0.0,
        block_cost_context=None,
    )
    metrics = f"http://127.0.0.1:{stack.orchestrator.metrics_port}/metrics"
    services = [f"http://127.0.0.1:{s.metrics_port}/metrics" for s in (stack.primary, stack.secondary)]
    report = run(
        cfg,
        PROMPTS,
        engine=engine,
        target=stack.orchestrator.address,
        metrics_url=metrics,
        service_metrics=services,
        log=print,
    )
    _check_run(report, cfg.modes[:2], ("in-process", "grpc"))
    assert report["consistent_across_vias"] == {"primary": True, "tandem-speed": True, declining: True}
    assert set(report["tax"]) == set(cfg.modes) and all(t > 0 for t in report["tax"].values())
    for mode in cfg.modes[1:]:
        ip, gr = report["in_process"][mode], report["modes"][mode]
        for key in (
            "rounds",
            "drafted_tokens",
            "accepted_tokens",
            "accepted_per_position",
            "primary_calls_per_token",
            "drafter_calls_per_token",
        ):
            assert ip[key] == gr[key], (mode, key)  # the same request loop on both sides
    declined = report["modes"][declining]
    assert declined["drafter_calls_per_token"] > declined["rounds"] / declined["output_tokens"]  # declines count
    for via in ("in-process", "grpc"):  # the model services' busy time against the client's: the overhead
        for mode in cfg.modes:
            r = report["results"][via][mode]
            e2el = sum(p["e2el_s"] for p in r["per_prompt"])
            assert 0 < r["model_s"] < e2el and r["overhead"] == pytest.approx(1 - r["model_s"] / e2el), (via, mode)
    assert "| tandem-speed | grpc |" in render_markdown(report).split("Orchestration overhead")[1]
    assert report["server_counters"] == {"drafter_fallbacks": 0.0, "failovers": 0.0}
    assert report["block_cost"] is None and identity_warnings(report) == []
    assert stack.settled_sessions() == 0


class _FakePeer:
    """Replays the engine's primary outputs (assisted: with one token changed at position `wrong_at`); `calls` records
    (name, assisted, prompt) in the order they came."""

    def __init__(self, engine: Engine, name: str = "fake", wrong_at: int | None = None, calls: list | None = None):
        self.engine, self.name, self.wrong_at, self.warmed = engine, name, wrong_at, False
        self.calls = calls if calls is not None else []

    def warmup(self) -> None:
        self.warmed = True

    def describe(self) -> dict:
        return {"name": self.name}

    def _ids(self, prompt_ids: list[int], max_tokens: int, assisted: bool) -> list[int]:
        self.calls.append((self.name, assisted, tuple(prompt_ids)))
        ids = self.engine.generate(prompt_ids, mode="primary", max_tokens=max_tokens).token_ids
        if assisted and self.wrong_at is not None:
            ids = [*ids[: self.wrong_at], (ids[self.wrong_at] + 1) % 48, *ids[self.wrong_at + 1 :]]
        return ids

    def generate(self, prompt_ids: list[int], max_tokens: int, *, assisted: bool) -> PeerResult:
        return PeerResult(self._ids(prompt_ids, max_tokens, assisted), 0.01, 0.1, 3 if assisted else 0)


class _FakeLookupPeer(_FakePeer):
    """As llama.cpp's peer reports: plain, one pass per token; lookup, 2 rounds of 2 drafts, 3 of them kept."""

    def generate(self, prompt_ids: list[int], max_tokens: int, *, assisted: bool) -> PeerResult:
        ids = self._ids(prompt_ids, max_tokens, assisted)
        if not assisted:
            return PeerResult(ids, 0.01, 0.2, primary_calls=len(ids), rounds=0, drafted_tokens=0, accepted_tokens=0)
        counters = {"rounds": 2, "drafted_tokens": 4, "accepted_tokens": 3, "accepted_per_position": (2, 1)}
        return PeerResult(ids, 0.01, 0.05, primary_calls=len(ids) - 3, lookup=True, **counters)


def test_peers_run_interleaved_and_are_checked(engine: Engine) -> None:
    cfg = BenchConfig(
        modes=("primary",), vias=("in-process",), max_tokens=TOKENS, block_cost_context=None, peers=("hf", "llamacpp")
    )
    calls: list = []
    hf = _FakePeer(engine, "hf", wrong_at=5, calls=calls)
    llama = _FakeLookupPeer(engine, "llamacpp", calls=calls)
    report = run(cfg, PROMPTS, engine=engine, peers={"hf": hf, "llamacpp": llama}, log=lambda _: None)
    assert hf.warmed and llama.warmed
    assert report["peers"] == {"hf": {"name": "hf"}, "llamacpp": {"name": "llamacpp"}}
    assert list(report["modes"]) == ["primary", "hf", "hf-assisted", "llamacpp", "llamacpp-lookup"]
    # After the warm-ups, A B B A: the peers' modes in order on the first prompt, reversed on the second.
    turns = [("hf", False), ("hf", True), ("llamacpp", False), ("llamacpp", True)]
    measured = calls[len(turns) :]
    assert [c[:2] for c in measured] == turns + turns[::-1]
    assert [c[2] for c in measured] == [PROMPTS[0].ids] * 4 + [PROMPTS[1].ids] * 4
    assert report["modes"]["hf"]["via"] == report["modes"]["llamacpp"]["via"] == "in-process"
    primary_tps = report["results"]["in-process"]["primary"]["tokens_per_s"]
    assert report["speedup"]["hf"] == pytest.approx(TOKENS / 0.1 / primary_tps)
    assert report["speedup"]["llamacpp-lookup"] == pytest.approx(TOKENS / 0.05 / primary_tps)
    assert report["identical"] == {
        "primary": True,
        "hf": True,
        "hf-assisted": False,
        "llamacpp": True,
        "llamacpp-lookup": True,
    }
    want = report["results"]["in-process"]["primary"]["outputs"]
    assert report["mismatches"]["hf-assisted"] == [
        {"via": "in-process", "prompt": i, "position": 5, "expected": want[i][5], "got": (want[i][5] + 1) % 48}
        for i in range(2)
    ]
    assert report["mismatches"]["llamacpp"] == report["mismatches"]["llamacpp-lookup"] == []
    assert report["modes"]["hf-assisted"]["drafter_calls_per_token"] == pytest.approx(3 / TOKENS)
    assert report["modes"]["hf"]["rounds"] is None  # HF's results carry no counters: reported as unknown
    plain, lookup = report["modes"]["llamacpp"], report["modes"]["llamacpp-lookup"]
    assert plain["primary_calls_per_token"] == 1.0 and plain["drafter_calls_per_token"] == 0.0
    assert plain["mean_acceptance_length"] is None and plain["lookup_rounds"] is None
    assert lookup["primary_calls_per_token"] == pytest.approx((TOKENS - 3) / TOKENS)
    assert lookup["drafter_calls_per_token"] == 0.0  # prompt lookup calls no drafter
    assert lookup["rounds"] == lookup["lookup_rounds"] == 4 and lookup["lookup_accepted_tokens"] == 6
    assert lookup["mean_acceptance_length"] == pytest.approx(1 + 6 / 4)
    assert lookup["acceptance_per_position"] == pytest.approx([1.0, 0.5])
    warning = identity_warnings(report)[0]
    assert warning.startswith("WARNING: hf-assisted is NOT identical to primary on 2/2 prompts")
    assert f"prompt 1 (in-process) at token 5 (primary {want[0][5]}, hf-assisted {(want[0][5] + 1) % 48})" in warning
    markdown = render_markdown(report)
    assert "| llamacpp-lookup | in-process |" in markdown and "Peer llamacpp: name = llamacpp" in markdown
