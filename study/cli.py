"""`mlet study`: accuracy against embedding size.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse

from mlet.arguments import int_list, int_pair, name_list


def add_parser(stages) -> None:
    study = stages.add_parser("study", help="accuracy against embedding size: the MLET study")
    study.add_argument("--data", required=True, help="dataset folder")
    study.add_argument("--out", help="study folder (default results/study-<data folder>)")
    study.add_argument("--quick", action="store_true", help="the small grid (minutes)")
    study.add_argument("--seeds", type=int_list, help="seeds (default 0,1,2)")
    study.add_argument("--regimes", type=name_list, help="one-pass,tuned (default both)")
    study.add_argument("--max-rows", type=int, help="use the first N rows (0: all)")
    study.add_argument("--workers", type=int, default=1, help="cells trained in parallel")
    study.add_argument("--threads", type=int, default=0, help="torch threads per worker")
    study.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    study.add_argument("--stage", choices=["all", "grid", "overhead", "report"], default="all")
    study.add_argument("--title", help="name used in the report and plots")
    study.add_argument(
        "--optimizer",
        choices=["rwsadagrad", "adagrad", "sgd", "adam"],
        help="as mlet train's (default rwsadagrad)",
    )
    study.add_argument(
        "--overhead-widths",
        type=int_pair,
        metavar="D,EQUAL",
        help="MLET width to time and the full width of equal accuracy (default: the study's)",
    )
    for name in GRID_OPTIONS:
        flag = "--" + name.replace("_", "-")
        study.add_argument(flag, type=int_list, help=f"a subset of the grid's {name}")
    study.set_defaults(handler=cmd_study)


GRID_OPTIONS = ("full_dims", "mlet_dims", "mlet_hidden", "svd_dims", "contrast_dims")


def cmd_study(args: argparse.Namespace) -> None:
    from study.command import StudyCommand, run_study_command

    fields = ("data", "out", "quick", "seeds", "regimes", "max_rows", "workers", "threads")
    options = {name: getattr(args, name) for name in fields}
    grid = {name: getattr(args, name) for name in GRID_OPTIONS}
    command = StudyCommand(
        **options,
        device=args.device,
        stage=args.stage,
        title=args.title,
        grid=grid,
        overhead_widths=args.overhead_widths,
        optimizer=args.optimizer,
    )
    report = run_study_command(command)
    print(f"report: {report}")
