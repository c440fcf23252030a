"""The served primary's two CPU changes measured in one process: its Q4_1 layer products on 8-bit inputs (the
kernel's dot form, `BundleConfig(int8_activations=...)`) and attention and norms in the kernels' fixed order
(`PrimaryRunner(fixed_order=...)`). Prints the block cost at k = 1..16 after 256 cached tokens for the three
configurations, interleaved, then how far a 2-token verify's logits and states land from two one-token steps': with
8-bit inputs but XLA's attention the rounding turns XLA's last-bit differences into different tokens; in fixed order
they are bitwise equal; last, what the 8-bit inputs cost in accuracy: cross-entropy of both input forms on a text
(default: tests/data/corpus_sample.txt, a fixed text) and how often their top-1 predictions agree.
Usage: `.venv/bin/python experiments/int8_activations.py [TEXT]` (~5 min)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tandem.decoding.bundle import BundleConfig, load_primary_params
from tandem.decoding.costs import measure_block_cost
from tandem.model.primary import PrimaryRunner

PROMPT = "The capital of France is Paris. The capital of Germany is"
CONFIGS = {  # name -> (int8 inputs, fixed order)
    "float inputs, XLA attention (the previous release)": (False, False),
    "float inputs, fixed order": (False, True),
    "8-bit inputs, XLA attention": (True, False),
    "8-bit inputs, fixed order (served)": (True, True),
}


def verify_against_steps(runner: PrimaryRunner, ids: list[int]) -> dict[str, float]:
    """Max |difference| of logits and tapped states between a 2-token verify [t0, t1] and two one-token steps."""
    runner.truncate(0, 0)
    out = runner.forward(np.asarray([ids]))
    runner.commit(0, len(ids))
    t0 = int(out.logits[0, -1].argmax())
    step0 = runner.forward(np.array([[t0]]))
    t1 = int(step0.logits[0, 0].argmax())
    block = runner.forward(np.array([[t0, t1]]))  # not committed: the steps below see the same cache
    runner.commit(0, 1)
    step1 = runner.forward(np.array([[t1]]))
    return {
        "logits": float(max(np.abs(block.logits[0, j] - s.logits[0, 0]).max() for j, s in enumerate((step0, step1)))),
        "hidden": float(max(np.abs(block.hidden[0, j] - s.hidden[0, 0]).max() for j, s in enumerate((step0, step1)))),
        "logit_scale": float(np.abs(step1.logits).max()),
    }


def accuracy(runners: dict[bool, PrimaryRunner], ids: list[int], window: int = 256, most: int = 4096) -> dict:
    """Mean next-token cross-entropy (nats) of float and 8-bit inputs over windows of the text, and top-1 agreement."""
    ce: dict[bool, list[np.ndarray]] = {act: [] for act in runners}
    top: dict[bool, list[np.ndarray]] = {act: [] for act in runners}
    for start in range(0, min(len(ids), most) - window, window):
        chunk = ids[start : start + window + 1]
        for act, runner in runners.items():
            runner.truncate(0, 0)
            logits = runner.forward(np.asarray([chunk[:-1]])).logits[0].astype(np.float64)  # [T, V]
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            ce[act].append(-logp[np.arange(window), chunk[1:]])
            top[act].append(logits.argmax(axis=-1))
    return {
        "tokens": int(sum(len(c) for c in ce[False])),
        "ce_float_inputs": float(np.concatenate(ce[False]).mean()),
        "ce_8bit_inputs": float(np.concatenate(ce[True]).mean()),
        "top1_agreement": float((np.concatenate(top[False]) == np.concatenate(top[True])).mean()),
    }


def main(text: Path, context: int = 256, max_k: int = 16) -> None:
    params = {act: load_primary_params(BundleConfig(int8_activations=act)) for act in (False, True)}
    runners = {}
    for name, (act, fixed) in CONFIGS.items():
        pcfg, p, tokenizer = params[act]
        runners[name] = PrimaryRunner(pcfg, p, taps=(16,), batch=1, max_len=2 * context, fixed_order=fixed)
    for rep in range(2):
        for name, runner in runners.items():
            ms = measure_block_cost(runner, context=context, max_k=max_k, calls=11)
            print(json.dumps({"config": name, "pass": rep, "ms": {k: round(v, 1) for k, v in ms.items()}}), flush=True)
    ids = tokenizer.encode(PROMPT)
    for name, runner in runners.items():
        print(json.dumps({"config": name, "verify_vs_steps": verify_against_steps(runner, ids)}))
    served = {act: runners[name] for name, (act, fixed) in CONFIGS.items() if fixed}
    print(json.dumps({"text": str(text), **accuracy(served, tokenizer.encode(text.read_text()))}))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "tests" / "data" / "corpus_sample.txt")
