"""`tandem bench`: every mode on the same prompts, in process and through gRPC, in one run.

    from benchmark.config import BenchConfig
    from benchmark.report import render_markdown
    from benchmark.run import run

    report = run(BenchConfig(modes=("primary", "tandem-speed"), vias=("in-process",)), prompts, engine=engine)
    print(render_markdown(report))

    config.py    BenchConfig: the modes (with their own settings, MODE@TAU_FIRST:TAU:GAMMA_MAX) and the vias
    prompts.py   the JSONL prompt set and the token ids it is sent as
    run.py       the interleaved run (`run`), and `run_with_bundle`, what the command line calls
    backends.py  in process, through the public gRPC API, or a peer: Hugging Face transformers (`benchmark.peer_hf`)
                 or llama.cpp (`benchmark.peer_llamacpp`), `--peer hf,llamacpp`
    stats.py     the figures from the samples: TTFT, TPOT, percentiles, acceptance, speedups, tax (shared by loadtest)
    micro.py     the block-cost curve and the drafter step (measured by `tandem.decoding.costs`)
    machine.py   the machine and the git commit of a run
    metrics.py   the services' Prometheus metrics (busy seconds, fallback counters)
    report.py    the JSON report, its markdown and plot, progress lines
    stack.py     the three services started for a gRPC run (`tandemrpc.launch.ServeStack`)

What is measured (docs/design.md, Metric definitions, as vLLM's `bench serve`):

- Greedy, batch 1, one request at a time. Prompts are token ids (the command line renders each prompt with the chat
  template, as `tandem generate --chat` does, and sends the same ids in process and through gRPC).
- The runs are interleaved: for each prompt, each (mode, via) in turn, so drift (thermal, other load) hits every mode
  alike. Before them, one warm-up generation per (mode, via) of the longest prompt at full length, so every compiled
  shape the measured runs need (blocks and contexts are bucketed by powers of two) exists before the clock runs.
- Times are taken on the client side: TTFT = request sent → first chunk carrying tokens; E2EL = request sent → last
  chunk; TPOT = (E2EL − TTFT) / (output tokens − 1); tokens/s = output tokens / E2EL. Per mode: the median over
  prompts (TTFT also p90, mean, p99).
- Speculation counters are pooled over prompts, as vLLM's Prometheus counters are: mean acceptance length =
  1 + accepted / rounds (`GenerationStats.mean_acceptance_length`), acceptance rate = accepted / drafted, acceptance
  per position j = rounds accepting draft j / rounds (vLLM's per-position rate).
- Primary calls per token: in process, `GenerationStats.primary_calls`; through gRPC, the chunks carrying tokens (the
  orchestrator streams one per primary pass; a last pass that only meets a stop token sends none). Drafter calls per
  token: drafting requests, one per round (`GenerationStats.drafter_calls`, equal to `rounds`).
- `identical`: per mode, whether every prompt's token ids equal the primary's (the losslessness check).
- The block-cost curve: ms per `PrimaryRunner.forward` of k = 1..16 tokens after a prefilled context; blocks are
  padded to a power of two, so the curve is a staircase. The drafter step: ms per `DrafterRunner.step` of one token.

The report (a JSON-able dict, see `report.build_report`) renders to markdown with `report.render_markdown` (also what
`tandem bench-report` runs) and to a PNG with `report.render_plot`. The package imports JAX only through the engine it
is given (or `run_with_bundle` loads) and gRPC only when a gRPC target is measured.
"""
