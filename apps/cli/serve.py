"""`tandem serve` and `tandem demo`: the three services as local processes (`tandemrpc.launch.ServeStack`)."""

from __future__ import annotations

import argparse
import json
import sys

from apps.cli.common import DEFAULT_PORT, summary
from tandem.config import DEFAULT_MODE, MODES


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run primary, secondary and orchestrator as local processes until interrupted")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"orchestrator port, 0 = a free one (default: {DEFAULT_PORT})"
    )
    p.add_argument("--state-file", metavar="FILE", help="write addresses, pids and metrics URLs here as JSON")
    p.add_argument("--slots", type=int, default=4, help="concurrent sessions per model service (default: 4)")
    p.add_argument("--max-len", type=int, default=2048, help="positions per session (default: 2048)")
    p.add_argument("--log-dir", metavar="DIR", help="service logs go here (default: a new temporary directory)")
    p.add_argument(
        "--startup-timeout", type=float, default=600.0, metavar="S", help="wait this long for SERVING (default: 600)"
    )
    p.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="report SERVING before compiling (the first requests then wait for compiles)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the three services, stream one generation through gRPC, stop")
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)


def serve(args: argparse.Namespace) -> int:
    from tandemrpc.launch import ServeError, ServeStack, interrupt_on_signals

    def say(msg: str) -> None:
        print(f"tandem serve: {msg}", file=sys.stderr, flush=True)

    try:
        stack = ServeStack(
            port=args.port,
            slots=args.slots,
            max_len=args.max_len,
            log_dir=args.log_dir,
            startup_timeout_s=args.startup_timeout,
            warm=args.warm,
        )
    except ValueError as e:
        raise SystemExit(f"tandem serve: {e}") from None
    say(f"starting primary, secondary and orchestrator; logs in {stack.log_dir}")
    with interrupt_on_signals():
        try:
            stack.start(on_ready=lambda name, s: say(f"{name} serving after {s:.1f}s"))
        except (ServeError, OSError) as e:
            say(str(e))
            return 1
        except KeyboardInterrupt:
            say("interrupted while starting; stopped")
            return 130
        try:
            if args.state_file:
                stack.write_state(args.state_file)
            print(f"orchestrator {stack.orchestrator_address}", flush=True)
            print(json.dumps(stack.state()), flush=True)
            say(f'try: tandem generate "The capital of France is" --target {stack.orchestrator_address}')
            stack.wait()
        except KeyboardInterrupt:
            say("stopping")
            return 0
        except (ServeError, OSError) as e:
            say(str(e))
            return 1
        finally:
            stack.stop()


def demo(args: argparse.Namespace) -> int:
    """The main job: the services as separate processes, one streamed generation through the public API."""
    from tandemrpc.client import TandemClient, stream_remote
    from tandemrpc.launch import ServeStack

    print("tandem demo: starting primary, secondary and orchestrator (they compile before serving)", file=sys.stderr)
    stack = ServeStack(port=0, slots=1, max_len=1024)
    try:
        stack.start(on_ready=lambda name, s: print(f"tandem demo: {name} serving after {s:.1f}s", file=sys.stderr))
        print(f"tandem demo: {args.mode} via {stack.orchestrator_address}\n{args.prompt}", end="", flush=True)
        with TandemClient(stack.orchestrator_address) as client:
            stream = stream_remote(client, args.prompt, mode=args.mode, max_tokens=args.max_tokens)
            try:
                while True:
                    print(next(stream), end="", flush=True)
            except StopIteration as done:
                result = done.value
        print(flush=True)
        print(f"[{args.mode}] {summary(result.stats)} finish={result.finish_reason}", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers this module's commands on the `tandem` parser."""
    _add_serve(sub)
    _add_demo(sub)


COMMANDS = {"serve": serve, "demo": demo}
