"""`mlet`: one command, a subcommand per stage, registered in pipeline order.

Each stage owns its command module (`<stage>/cli.py`: its parser and thin handlers) and
imports its own code inside the handlers, so `mlet serve` never loads torch and
`mlet --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench.cli
import data.cli
import export.cli
import predict.cli
import serve.cli
import study.cli
import train.cli

STAGES = (data.cli, train.cli, study.cli, export.cli, serve.cli, bench.cli, predict.cli)


def add_demo(stages) -> None:
    demo = stages.add_parser("demo", help="the whole pipeline on the synthetic default")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--rows", type=int, default=500_000)
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=Path(args.out), rows=args.rows))
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlet", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES[:-1]:
        stage.add_parser(stages)
    add_demo(stages)  # after bench, before predict: the order `mlet --help` always showed
    STAGES[-1].add_parser(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given, for a handler that relaunches itself
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("mlet: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"mlet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
