"""The primary with its Q4_1 layer products on 8-bit inputs (`BundleConfig(int8_activations=True)`, the kernel's dot
form) against the served float-input products: block cost at k = 1..16 after 256 cached tokens, both primaries
interleaved in one process, then why the form is off: how far a 2-token verify's outputs land from single steps'.
Usage: `.venv/bin/python bench/int8_activations.py` (~2 min)."""

from __future__ import annotations

import json

import numpy as np

from tandem.bench import measure_block_cost
from tandem.models import BundleConfig, load_primary

PROMPT = "The capital of France is Paris. The capital of Germany is"


def verify_against_steps(int8_activations: bool) -> dict[str, float]:
    """Max |difference| of logits and tapped states between a 2-token verify [t0, t1] and two one-token steps."""
    runner, tokenizer = load_primary(BundleConfig(slots=1, max_len=256, int8_activations=int8_activations))
    ids = np.array([tokenizer.encode(PROMPT)], np.int32)
    out = runner.forward(ids)
    runner.commit(0, ids.shape[1])
    t0 = int(out.logits[0, -1].argmax())
    step0 = runner.forward(np.array([[t0]]))
    t1 = int(step0.logits[0, 0].argmax())
    block = runner.forward(np.array([[t0, t1]]))  # not committed: the steps below see the same cache
    runner.commit(0, 1)
    step1 = runner.forward(np.array([[t1]]))
    return {
        "logits_col0": float(np.abs(block.logits[0, 0] - step0.logits[0, 0]).max()),
        "logits_col1": float(np.abs(block.logits[0, 1] - step1.logits[0, 0]).max()),
        "hidden_col1": float(np.abs(block.hidden[0, 1] - step1.hidden[0, 0]).max()),
        "logit_scale": float(np.abs(step1.logits).max()),
    }


def main(context: int = 256, max_k: int = 16) -> None:
    runners = {
        act: load_primary(BundleConfig(slots=1, max_len=2 * context, int8_activations=act))[0] for act in (False, True)
    }
    for rep in range(2):
        for act, runner in runners.items():
            ms = measure_block_cost(runner, context=context, max_k=max_k, calls=11)
            print(json.dumps({"int8_activations": act, "pass": rep, "ms": {k: round(v, 1) for k, v in ms.items()}}))
    del runners
    for act in (False, True):
        print(json.dumps({"int8_activations": act, "verify_vs_steps": verify_against_steps(act)}))


if __name__ == "__main__":
    main()
