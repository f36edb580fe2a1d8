"""`mlet train`: a dataset folder -> a run folder, on one process or under torchrun.

Stage code is imported inside the handlers, so the parser stays cheap to build. Options
left unset take TrainConfig's defaults, or, with --resume, the interrupted run's values.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlet.arguments import int_list

# option -> TrainConfig field, for the options that configure training
CONFIG_OPTIONS = (
    "embedding",
    "dim",
    "hidden",
    "bottom_mlp",
    "top_mlp",
    "interaction",
    "optimizer",
    "lr",
    "embedding_lr",
    "batch_size",
    "epochs",
    "patience",
    "stop_on",
    "eval_every",
    "checkpoint_every",
    "lr_warmup_steps",
    "lr_decay_start",
    "lr_decay_steps",
    "sharding",
    "seed",
    "device",
)


def add_parser(stages) -> None:
    train = stages.add_parser("train", help="train a DLRM and write a run folder")
    train.add_argument("--data", help="dataset folder")
    train.add_argument("--out", help="run folder to create, e.g. runs/NAME")
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the interrupted run RUN from its latest checkpoint",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes to train on (launches torchrun; gloo on CPU, NCCL on CUDA)",
    )
    model = train.add_argument_group("model")
    model.add_argument("--embedding", choices=["full", "mlet"])
    model.add_argument("--dim", type=int, help="embedding width D")
    model.add_argument("--hidden", type=int, help="inner width K of a multi-layer table")
    model.add_argument(
        "--bottom-mlp",
        type=int_list,
        metavar="W,W,...",
        help="hidden widths of the bottom MLP (its output is D); default 64",
    )
    model.add_argument(
        "--top-mlp",
        type=int_list,
        metavar="W,W,...",
        help="hidden widths of the top MLP (its output is one logit); default 64,32",
    )
    model.add_argument(
        "--interaction",
        choices=["dot", "cat"],
        help="dot: pairwise dots (DLRM, the default); cat: the vectors concatenated",
    )
    fit = train.add_argument_group("optimisation")
    fit.add_argument(
        "--optimizer",
        choices=["rwsadagrad", "adagrad", "sgd", "adam"],
        help="the tables' fused FBGEMM update (default rwsadagrad: exact row-wise "
        "Adagrad); the MLPs take torch's optimizer of the same family",
    )
    fit.add_argument("--lr", type=float, help="learning rate (default 0.02)")
    fit.add_argument("--embedding-lr", type=float, help="learning rate of the tables")
    fit.add_argument("--batch-size", type=int, help="global batch, split among processes")
    fit.add_argument("--epochs", type=int, help="most epochs (default 5)")
    fit.add_argument("--patience", type=int, help="validations without improvement to stop")
    fit.add_argument(
        "--stop-on",
        choices=["logloss", "auc"],
        help="the validation metric for early stopping (default logloss)",
    )
    fit.add_argument("--eval-every", type=int, metavar="STEPS", help="validate every STEPS too")
    fit.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="checkpoint every STEPS too (always after each validation)",
    )
    fit.add_argument("--lr-warmup-steps", type=int, help="linear warm-up (DLRM's; default 0)")
    fit.add_argument("--lr-decay-start", type=int, help="step where the square decay starts")
    fit.add_argument("--lr-decay-steps", type=int, help="steps of the decay (default 0: none)")
    fit.add_argument(
        "--sharding",
        choices=["table", "row", "column"],
        help="shard every table this way (default: TorchRec's planner chooses)",
    )
    fit.add_argument("--seed", type=int)
    fit.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    train.add_argument("--overwrite", action="store_true")
    train.set_defaults(handler=cmd_train)


def given_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name) is not None}


def resumed_config(run: str, given: dict, data: str | None):
    """The interrupted run's config and data folder; options given must agree with it."""
    from pathlib import Path

    from mlet.files import read_json
    from train.checkpoint import TRAINER_STATE, checkpoint_path
    from train.trainer import TrainConfig, checkpoint_root

    state = read_json(checkpoint_path(checkpoint_root(Path(run))) / TRAINER_STATE)
    fixed = state["identity"]["train"]  # what decides the network and its training
    for name, value in given.items():
        if name in fixed and _normal(fixed[name]) != _normal(value):
            raise SystemExit(
                f"error: --resume {run}: the run was started with "
                f"--{name.replace('_', '-')} {fixed[name]}, not {value}"
            )
    if data and Path(data).resolve() != Path(state["data_folder"]).resolve():
        raise SystemExit(f"error: --resume {run}: the run trains on {state['data_folder']}")
    config = TrainConfig(**{**state["config"], **given})
    return config, state["data_folder"]


def _normal(value):
    return list(value) if isinstance(value, tuple | list) else value


def launch_torchrun(nproc: int, argv: list[str], device: str) -> int:
    """Run this same command on `nproc` processes under torchrun; its exit status."""
    import subprocess

    import torch

    from train.distributed import resolve_device

    if resolve_device(device).type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise SystemExit(f"error: --nproc {nproc} is more than this machine's {gpus} GPUs")
    elif nproc > (cores := os.cpu_count() or 1):
        raise SystemExit(f"error: --nproc {nproc} is more than this machine's {cores} CPU cores")
    rest = _without_nproc(argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "cli", *rest]  # fmt: skip
    return subprocess.call(command)


def _without_nproc(argv: list[str]) -> list[str]:
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return rest


def cmd_train(args: argparse.Namespace) -> None:
    if args.nproc < 1:
        raise SystemExit(f"error: --nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        status = launch_torchrun(args.nproc, args.argv, args.device or "auto")
        if status:
            raise SystemExit(status)
        return
    from train.trainer import TrainConfig, train_run

    given = given_options(args)
    if args.resume:
        config, data = resumed_config(args.resume, given, args.data)
        out = args.resume
        if args.out and args.out != args.resume:
            raise SystemExit("error: --resume RUN writes RUN; leave --out out")
    else:
        missing = [f"--{n}" for n in ("data", "out") if getattr(args, n) is None]
        missing += ["--dim"] if "dim" not in given else []
        if missing:
            raise SystemExit(f"error: mlet train needs {', '.join(missing)} (or --resume RUN)")
        config, data, out = TrainConfig(**given), args.data, args.out
    try:
        result = train_run(data, out, config, overwrite=args.overwrite, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(
            f"mlet train: interrupted; continue with `mlet train --resume {out}`", file=sys.stderr
        )
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", "0")) == 0:
        test = result.metrics["test"]
        print(
            f"wrote {out}: test AUC {test['auc']:.4f}, logloss {test['logloss']:.4f}, "
            f"best at epoch {result.metrics['best_epoch']} step {result.metrics['best_step']}, "
            f"{result.metrics['train_seconds']:.1f}s on {result.metrics['processes']} process(es)"
        )
