"""`mlet train`: a dataset folder -> a run folder.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse

from mlet.arguments import int_list


def add_parser(stages) -> None:
    train = stages.add_parser("train", help="train a DLRM and write a run folder")
    train.add_argument("--data", required=True, help="dataset folder")
    train.add_argument("--out", required=True, help="run folder to create, e.g. runs/NAME")
    train.add_argument("--embedding", choices=["full", "mlet"], default="full")
    train.add_argument("--dim", type=int, required=True, help="embedding width D")
    train.add_argument("--hidden", type=int, help="inner width K of a multi-layer table")
    train.add_argument("--bottom-mlp", type=int_list, default=(64,), metavar="W,W,...",
                       help="hidden widths of the bottom MLP (its output is D)")  # fmt: skip
    train.add_argument("--top-mlp", type=int_list, default=(64, 32), metavar="W,W,...",
                       help="hidden widths of the top MLP (its output is one logit)")  # fmt: skip
    train.add_argument("--interaction", choices=["dot", "cat"], default="dot",
                       help="dot: pairwise dots (DLRM); cat: the vectors concatenated")  # fmt: skip
    train.add_argument("--optimizer", choices=["adagrad", "sgd"], default="adagrad")
    train.add_argument("--lr", type=float, default=0.02)
    train.add_argument("--embedding-lr", type=float, help="learning rate of the tables")
    train.add_argument("--batch-size", type=int, default=512)
    train.add_argument("--epochs", type=int, default=5, help="most epochs (early stopping)")
    train.add_argument("--patience", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--overwrite", action="store_true")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    from train.trainer import TrainConfig, train_run

    config = TrainConfig(
        embedding=args.embedding,
        dim=args.dim,
        hidden=args.hidden,
        bottom_mlp=args.bottom_mlp,
        top_mlp=args.top_mlp,
        interaction=args.interaction,
        optimizer=args.optimizer,
        lr=args.lr,
        embedding_lr=args.embedding_lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )
    result = train_run(args.data, args.out, config, overwrite=args.overwrite)
    test = result.metrics["test"]
    print(
        f"wrote {args.out}: test AUC {test['auc']:.4f}, logloss {test['logloss']:.4f}, "
        f"best epoch {result.metrics['best_epoch']}, {result.metrics['train_seconds']:.1f}s"
    )
