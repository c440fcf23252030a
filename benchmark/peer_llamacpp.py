"""The llama.cpp peer (through llama-cpp-python) for the speed benchmark.

llama.cpp runs the very GGUF our primary loads (`BundleConfig.resolved_gguf()`: SmolLM2-135M-Instruct, Q4_1 layers and
the Q8_0 embedding that is also the head) with its own CPU kernels, through `llama_cpp.Llama`. Two modes:

    llamacpp          plain greedy decoding: `Llama.generate`, one decode per token after the prompt's.
    llamacpp-lookup   the same with the binding's prompt-lookup drafting (`Llama(draft_model=
                      llama_cpp.llama_speculative.LlamaPromptLookupDecoding(...))`): after each token it finds the
                      newest 2 tokens (else the newest one) at their first occurrence in the sequence so far and
                      appends the tokens that followed them to the next decode, keeping those that greedy decoding
                      confirms (lossless up to llama.cpp's rounding, see Numerics).

Needs the `llamacpp` extra built for the host by docker/build-llamacpp.sh (llama-cpp-python 0.3.36 from its sdist,
with the instruction sets named one by one instead of GGML_NATIVE); pip's own build of the sdist would turn
GGML_NATIVE on.

What is compared, and how:
    * The prompt is our own token ids (the command line renders the chat template, as for every mode), passed to
      `Llama.generate` as they are: no llama.cpp chat template, no tokenization on its side.
    * Greedy: temp 0 gives the binding's sampler chain of its penalties (repeat 1.0, frequency 0, presence 0: a no-op)
      and greedy selection; top_k is 1 as well. The stop ids are our tokenizer's (`Tokenizer.stop_token_ids`); a stop
      token ends the generation and is not returned, as in `tandem.decoding.rounds.run_request`.
    * Cold prefill: `Llama.generate` would reuse the longest prefix of the previous sequence still in its KV cache;
      each generation calls `Llama.reset()` first, so every prompt is prefilled in full, like the bench's primary
      (its prefix cache is off).
    * TTFT: from calling `generate` to its first token (the prompt's decode and one greedy pick); elapsed: to the last.
    * Threads: `n_threads` and `n_threads_batch` are the cores this process may use (`os.sched_getaffinity`), the
      size XLA gives the intra-op pool our primary's kernels run on (2 on the development machine). llama.cpp's
      threads meet at every operation, so a core taken by another process stalls them: with a training job on one of
      the 2 cores, greedy decoding ran 8 to 18 times slower on 2 threads than on 1. Measure on quiet cores, or pass
      `threads=1` when they are shared.
    * Context: `n_ctx` = `BundleConfig.max_len` (the bench's --max-len), the positions our primary's cache has; a
      prompt plus max_tokens beyond it is refused.

Numerics. Both sides run the same Q4_1 / Q8_0 blocks with 8-bit inputs to the products, but llama.cpp quantizes those
inputs into its own blocks, keeps its KV cache in float16 (its default) and sums in its own order, so its logits differ
from ours by rounding, and at a near tie the greedy token flips; from there the two continuations part. Measured here
(the AVX-512 build) on "What is the capital of France?": the float64 reference ranks "The" over "L" by 0.08 and so do
we, llama.cpp ranks "L" first by 0.09 (with a float32 KV cache too), so the outputs part at their first token. Nor are
llama.cpp's logits independent of the batch: a token decoded alone and the same token inside a multi-token decode get
logits a few tenths apart (0.26 at the last position of that prompt), so llamacpp-lookup (whose verifying decodes carry
drafts) can part from llamacpp at a near tie too. Our primary's verify is bitwise equal to single steps (its kernels sum
in a fixed order).
tests/real_model/test_peer_llamacpp.py checks the agreement on a prompt without near ties.

The lookup instance computes logits at every position (`logits_all=True`): the binding needs them to check drafts and
turns them on itself when given a draft model, but sizes its logits buffer by the `logits_all` argument, so without it
any decode past `n_batch` (512) positions fails (a ValueError from NumPy, seen with a 600-token prompt). It also makes
the prompt's decode compute the head at every prompt position, part of what this mode costs in the binding.

The lookup settings: at most 2-token n-grams (the binding's default) and 2 drafted tokens per decode, the binding's
README advice for CPU-only machines (10, its default, for GPUs); not tuned here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import gguf
import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from benchmark.backends import PeerResult
from tandem.decoding.bundle import BundleConfig
from tandem.formats.tokenizer import Tokenizer

# The binding's prompt lookup: n-grams of at most 2 tokens, 2 drafted tokens per decode (see the module docstring).
DEFAULT_LOOKUP: dict[str, int] = {"max_ngram_size": 2, "num_pred_tokens": 2}

# Greedy and nothing else (`Llama.generate`'s sampling arguments).
GREEDY: dict[str, Any] = {"top_k": 1, "top_p": 1.0, "min_p": 0.0, "temp": 0.0, "repeat_penalty": 1.0}


def default_threads() -> int:
    """The cores this process may use: the size of XLA's intra-op pool, which runs our primary's kernels."""
    return len(os.sched_getaffinity(0))


class _CountingLlama(llama_cpp.Llama):
    """`Llama` that notes the tokens of every `eval` (one primary pass: the last token and any drafts after it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.evals: list[list[int]] = []
        super().__init__(*args, **kwargs)

    def eval(self, tokens: Sequence[int]) -> None:
        self.evals.append([int(t) for t in tokens])
        super().eval(tokens)


class LlamaCppPeer:
    """SmolLM2 under llama.cpp, greedy, on the GGUF our primary loads.

    Args:
        bundle_cfg: Where the GGUF is (`resolved_gguf()`) and the context length (`max_len` positions).
        threads: llama.cpp's threads for decoding and prompt processing (None: `default_threads()`).
        lookup: `LlamaPromptLookupDecoding`'s settings for the llamacpp-lookup mode (None: `DEFAULT_LOOKUP`).
    """

    def __init__(
        self,
        bundle_cfg: BundleConfig = BundleConfig(),
        *,
        threads: int | None = None,
        lookup: dict[str, int] | None = None,
    ) -> None:
        path = bundle_cfg.resolved_gguf()
        self.stop_token_ids = frozenset(int(t) for t in Tokenizer.from_gguf(gguf.GGUFReader(path)).stop_token_ids)
        self.threads = threads or default_threads()
        self.lookup = dict(DEFAULT_LOOKUP if lookup is None else lookup)
        common: dict[str, Any] = {
            "n_ctx": bundle_cfg.max_len,
            "n_threads": self.threads,
            "n_threads_batch": self.threads,
            "verbose": False,
        }
        self.plain = _CountingLlama(str(path), **common)
        self.drafting = _CountingLlama(
            str(path), **common, draft_model=LlamaPromptLookupDecoding(**self.lookup), logits_all=True
        )
        self.n_ctx = self.plain.n_ctx()

    def generate(self, prompt_ids: Sequence[int], max_tokens: int, *, assisted: bool) -> PeerResult:
        """Greedy generation of up to `max_tokens` tokens after `prompt_ids`.

        Args:
            prompt_ids: [T] prompt token ids (non-empty), used as they are.
            max_tokens: Most tokens to generate (>= 1); a stop token ends earlier and is not returned.
            assisted: Draft by prompt lookup (the llamacpp-lookup mode); else plain decoding (llamacpp).

        Returns:
            The tokens, timings and counters (`benchmark.backends.PeerResult`).

        Raises:
            ValueError: Empty prompt, max_tokens < 1, or prompt + max_tokens beyond the context.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt_ids) + max_tokens > self.n_ctx:
            raise ValueError(
                f"{len(prompt_ids)} prompt + {max_tokens} tokens exceed llama.cpp's context of {self.n_ctx}"
            )
        llm = self.drafting if assisted else self.plain
        llm.reset()  # no reuse of the previous sequence's KV cache: every prompt is prefilled cold
        llm.evals.clear()
        tokens: list[int] = []
        rounds = drafted = accepted = 0
        per_position: list[int] = []
        drafts: list[int] = []
        passes = offset = 0
        first: float | None = None
        start = time.perf_counter()
        stream = llm.generate([int(t) for t in prompt_ids], **GREEDY)
        try:
            for token in stream:
                if first is None:
                    first = time.perf_counter()
                if len(llm.evals) != passes:  # the first token of a new pass: it is checked against its first draft
                    passes, offset = len(llm.evals), 0
                    drafts = llm.evals[-1][1:] if passes > 1 else []  # a pass is the last token, then the drafts
                    if drafts:
                        rounds += 1
                        drafted += len(drafts)
                if offset < len(drafts) and token == drafts[offset]:
                    accepted += 1
                    per_position.extend([0] * (offset + 1 - len(per_position)))
                    per_position[offset] += 1
                offset += 1
                if token in self.stop_token_ids:
                    break
                tokens.append(int(token))
                if len(tokens) >= max_tokens:
                    break
        finally:
            stream.close()
        elapsed = time.perf_counter() - start
        return PeerResult(
            token_ids=tokens,
            ttft_s=(first if first is not None else start + elapsed) - start,
            elapsed_s=elapsed,
            primary_calls=len(llm.evals),
            rounds=rounds,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
            accepted_per_position=tuple(per_position),
            lookup=assisted,
        )

    def warmup(self) -> None:
        """One short generation of each kind (the first decodes allocate llama.cpp's compute buffers)."""
        prompt = [1, 2, 3, 4, 1, 2, 3]
        self.generate(prompt, 4, assisted=False)
        self.generate(prompt, 4, assisted=True)

    def describe(self) -> dict[str, Any]:
        """Versions, threads, context and lookup settings, and the instruction sets llama.cpp was built with."""
        return {
            "llama_cpp_python": llama_cpp.__version__,
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "lookup": ", ".join(f"{k}={v}" for k, v in self.lookup.items()),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }
