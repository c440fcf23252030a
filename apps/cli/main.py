"""The `tandem` command line: `main` parses the flags and hands them to the command's module. The command modules are
thin: they check flags and call the library, the launcher, the benchmark or the load test, importing each (and JAX) only
when their command runs.

    generate.py   tandem generate
    serve.py      tandem serve, tandem demo
    train.py      tandem corpus, train, distill-data, eval, tune
    measure.py    tandem bench, bench-report, loadtest
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from apps.cli import generate, measure, serve, train

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **generate.COMMANDS,
    **serve.COMMANDS,
    **train.COMMANDS,
    **measure.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem Transformers + SPEED serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (generate, serve, train, measure):  # the order of `tandem --help`
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
