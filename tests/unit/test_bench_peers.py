"""`tandem bench --peer`: several peers by name, their modes, the error without llama.cpp, and what a peer's result
becomes in the report (no model is run)."""

from __future__ import annotations

import sys

import pytest

from apps.cli.common import split_csv
from apps.cli.main import build_parser, main
from benchmark.backends import PeerBackend, PeerResult, load_peer
from benchmark.config import PEER_MODES, PEERS, BenchConfig, peer_of
from benchmark.prompts import BenchPrompt
from benchmark.report import build_report, identity_warnings
from benchmark.stats import Sample
from tandem.config import SpecConfig
from tandem.decoding.bundle import BundleConfig


def test_peers_add_their_modes_in_the_order_given() -> None:
    assert PEERS == {"hf": ("hf", "hf-assisted"), "llamacpp": ("llamacpp", "llamacpp-lookup")}
    assert PEER_MODES == ("hf", "hf-assisted", "llamacpp", "llamacpp-lookup")
    both = BenchConfig(modes=("primary", "speed"), peers=("llamacpp", "hf"))
    assert both.all_modes == ("primary", "speed", "llamacpp", "llamacpp-lookup", "hf", "hf-assisted")
    assert both.vias_of("llamacpp-lookup") == ("in-process",) and both.vias_of("speed") == ("in-process", "grpc")
    assert BenchConfig(modes=("primary",), peers=("llamacpp",)).all_modes == ("primary", "llamacpp", "llamacpp-lookup")
    assert BenchConfig().peers == () and BenchConfig().all_modes == BenchConfig().modes
    assert [peer_of(m) for m in ("hf-assisted", "llamacpp", "llamacpp-lookup", "primary")] == [
        "hf",
        "llamacpp",
        "llamacpp",
        None,
    ]


def test_peers_are_validated() -> None:
    with pytest.raises(ValueError, match=r"unknown peer\(s\) vllm; expected some of hf, llamacpp"):
        BenchConfig(peers=("hf", "vllm"))
    with pytest.raises(ValueError, match="peers repeat"):
        BenchConfig(peers=("llamacpp", "llamacpp"))
    with pytest.raises(ValueError, match="in-process"):
        BenchConfig(vias=("grpc",), peers=("llamacpp",))
    with pytest.raises(ValueError, match="not a string"):
        BenchConfig(peers="hf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown mode"):
        BenchConfig(modes=("primary", "llamacpp"))  # a peer's mode comes with its peer, not in --modes


def test_the_command_line_takes_a_comma_separated_list() -> None:
    parse = build_parser().parse_args
    base = ["bench", "--prompts", "p.jsonl", "--json", "out.json"]
    assert parse(base).peer is None
    args = parse([*base, "--peer", "hf, llamacpp"])
    assert BenchConfig(peers=split_csv(args.peer)).all_modes[-4:] == PEER_MODES
    assert split_csv(parse([*base, "--peer", "llamacpp"]).peer) == ("llamacpp",)
    with pytest.raises(SystemExit, match=r"tandem bench: unknown peer\(s\) vllm"):
        main([*base, "--peer", "llamacpp,vllm"])


def test_llamacpp_missing_names_the_build_script(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "benchmark.peer_llamacpp", raising=False)
    with pytest.raises(SystemExit, match=r"llama-cpp-python \(llama_cpp is missing\).*docker/build-llamacpp\.sh"):
        load_peer("llamacpp", BundleConfig())
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "benchmark.peer_hf", raising=False)
    with pytest.raises(SystemExit, match=r"--peer hf needs torch and transformers \(torch is missing\).*\[peer\]"):
        load_peer("hf", BundleConfig())
    with pytest.raises(SystemExit, match="unknown peer 'vllm'"):
        load_peer("vllm", BundleConfig())


class _Peer:
    def __init__(self, result: PeerResult) -> None:
        self.result, self.asked = result, []

    def warmup(self) -> None: ...

    def describe(self) -> dict:
        return {}

    def generate(self, prompt_ids: list[int], max_tokens: int, *, assisted: bool) -> PeerResult:
        self.asked.append(assisted)
        return self.result


def test_a_lookup_result_becomes_a_sample_with_lookup_counters() -> None:
    counters = {"rounds": 1, "drafted_tokens": 2, "accepted_tokens": 1, "accepted_per_position": (1,)}
    res = PeerResult([5, 6, 7], 0.02, 0.3, primary_calls=2, lookup=True, **counters)
    peer = _Peer(res)
    s = PeerBackend(peer, "llamacpp").generate([1, 2], "llamacpp-lookup", 3, SpecConfig())
    assert peer.asked == [True]
    assert s == Sample(
        token_ids=(5, 6, 7),
        ttft_s=0.02,
        e2el_s=0.3,
        finish_reason="length",
        rounds=1,
        drafted_tokens=2,
        accepted_tokens=1,
        accepted_per_position=(1,),
        primary_calls=2,
        drafter_calls=0,
        lookup_rounds=1,
        lookup_drafted_tokens=2,
        lookup_accepted_tokens=1,
    )
    plain_peer = _Peer(PeerResult([5], 0.02, 0.1, primary_calls=1, rounds=0, drafted_tokens=0, accepted_tokens=0))
    plain = PeerBackend(plain_peer, "llamacpp").generate([1], "llamacpp", 3, SpecConfig())
    assert plain.finish_reason == "stop" and plain.rounds == 0 and plain.lookup_rounds is None
    assert plain.primary_calls == 1 and plain.drafter_calls == 0
    with pytest.raises(ValueError, match="peer llamacpp runs modes llamacpp, llamacpp-lookup"):
        PeerBackend(peer, "llamacpp").generate([1], "hf", 3, SpecConfig())


def test_the_report_names_where_a_peer_parts_from_primary() -> None:
    cfg = BenchConfig(modes=("primary",), vias=("in-process",), max_tokens=4, peers=("llamacpp",))
    prompts = [BenchPrompt("a", "chat", (1, 2)), BenchPrompt("b", "code", (3,))]
    outputs = {
        "primary": [[7, 8, 9, 10], [4, 5, 6, 3]],
        "llamacpp": [[7, 8, 9, 10], [4, 5, 11, 12]],  # parts at token 2 of the second prompt
        "llamacpp-lookup": [[7, 8, 9], [4, 5, 6, 3]],  # ended (a stop token) before the primary's token 3
    }
    samples = {("in-process", m): [[Sample(tuple(ids), 0.01, 0.1)] for ids in outs] for m, outs in outputs.items()}
    report = build_report(cfg, prompts, samples, peer_info={"llamacpp": {"threads": 2}})
    assert report["peers"] == {"llamacpp": {"threads": 2}}
    assert report["identical"] == {"primary": True, "llamacpp": False, "llamacpp-lookup": False}
    assert report["mismatches"]["llamacpp"] == [
        {"via": "in-process", "prompt": 1, "position": 2, "expected": 6, "got": 11}
    ]
    assert report["mismatches"]["llamacpp-lookup"] == [
        {"via": "in-process", "prompt": 0, "position": 3, "expected": 10, "got": None}
    ]
    warnings = identity_warnings(report)
    assert warnings[0] == (
        "WARNING: llamacpp is NOT identical to primary on 1/2 prompts, the earliest from token 2: "
        "prompt 2 (in-process) at token 2 (primary 6, llamacpp 11)"
    )
    assert warnings[1].endswith("prompt 1 (in-process) at token 3 (primary 10, llamacpp-lookup end)")
