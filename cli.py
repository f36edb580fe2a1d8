"""`mlet`: one command, a subcommand per stage. Each handler only parses and calls a function.

Stage modules are imported inside the handlers, so `mlet serve` never loads torch and
`mlet --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def cmd_data_synth(args: argparse.Namespace) -> None:
    from mlet.data.synthetic import SyntheticConfig, generate

    options = {"rows": args.rows, "seed": args.seed, "hotness": args.hotness}
    if args.table_sizes:
        options["table_sizes"] = args.table_sizes
    schema = generate(SyntheticConfig(**options), args.out, overwrite=args.overwrite)
    print(
        f"wrote {schema.rows:,} rows to {args.out} (positive rate "
        f"{schema.source['positive_rate']:.3f}, oracle AUC {schema.source['oracle_auc']:.4f})"
    )


def cmd_data_criteo(args: argparse.Namespace) -> None:
    from mlet.data.criteo import NUM_SPARSE, CriteoConfig, convert

    sizes = args.table_sizes or (args.table_size,) * NUM_SPARSE
    config = CriteoConfig(table_sizes=sizes, max_rows=args.max_rows)
    schema = convert(args.source, args.out, config, overwrite=args.overwrite)
    print(f"wrote {schema.rows:,} rows to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from train.trainer import TrainConfig, train_run

    config = TrainConfig(
        embedding=args.embedding,
        dim=args.dim,
        hidden=args.hidden,
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


def cmd_export(args: argparse.Namespace) -> None:
    from export.exporter import ExportConfig, export_run

    config = ExportConfig(name=args.name, max_batch_size=args.max_batch_size, replace=args.replace)
    result = export_run(args.run, args.repo, config)
    parity = result.manifest["parity"]
    print(
        f"{result.status} {result.path}: collapse max abs diff "
        f"{parity['collapse_max_abs_diff']:.2e}, ONNX Runtime max abs diff "
        f"{parity['onnxruntime_max_abs_diff']:.2e}, {result.manifest['model_bytes']:,} bytes"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from serve.app import ServerLimits
    from serve.backends import SessionOptions
    from serve.dataplane import BatchingOverrides, PlaneConfig
    from serve.server import ServerConfig, run_server

    session = SessionOptions(
        intra_op_threads=args.threads,
        inter_op_threads=args.inter_op_threads,
        memory_arena=not args.no_memory_arena,
        graph_optimization=args.graph_optimization,
        allow_spinning=args.spin,
        providers=tuple(args.providers),
    )
    batching = BatchingOverrides(
        enabled={"on": True, "off": False, "config": None}[args.batching],
        max_queue_delay_us=args.max_queue_delay_us,
        preferred_batch_sizes=args.preferred_batch_sizes,
        instances=args.instances,
        max_queue_rows=args.max_queue_rows,
        timeout_s=args.request_timeout or None,
    )
    if args.repo is None and not args.torch_run:
        raise ValueError("give a model repository (--repo) or a run (--torch-run NAME=RUN)")
    run_server(
        ServerConfig(
            repo=Path(args.repo) if args.repo else None,
            host=args.host,
            port=args.port,
            models=args.models,
            plane=PlaneConfig(session=session, batching=batching, torch_runs=tuple(args.torch_run)),
            limits=ServerLimits(max_body_bytes=args.max_body_bytes),
        )
    )


def named_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_FOLDER, got {text!r}")
    return name, Path(path)


def cmd_bench_load(args: argparse.Namespace) -> None:
    from bench.load import LoadConfig, run_load

    config = LoadConfig(
        users=args.users, duration=args.duration, rows=args.rows, binary=args.binary
    )
    run_load(args.repo, args.models, config, args.out)
    print((Path(args.out) / "summary.md").read_text())


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from bench.serve_bench import ServeBenchConfig, run_serve_bench

    config = ServeBenchConfig(
        small_users=args.users,
        large_rows=args.rows,
        large_users=args.large_users,
        duration=args.duration,
        repetitions=args.repetitions,
    )
    run_serve_bench(args.repo, args.model, config, args.out)
    print((Path(args.out) / "serve.md").read_text())


def cmd_demo(args: argparse.Namespace) -> None:
    from demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=Path(args.out), rows=args.rows))
    print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlet", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="command", required=True)

    data = stages.add_parser("data", help="create a dataset folder").add_subparsers(
        dest="source", required=True
    )
    synth = data.add_parser("synth", help="the built-in synthetic Criteo-like dataset")
    synth.add_argument("--out", required=True, help="dataset folder to create")
    synth.add_argument("--rows", type=int, default=500_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--hotness", type=int, default=1, help="ids per table per row (summed)")
    synth.add_argument("--table-sizes", type=int_list, help="comma-separated rows per table")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(handler=cmd_data_synth)

    criteo = data.add_parser("criteo", help="convert a Criteo TSV file (.gz accepted)")
    criteo.add_argument("source", help="TSV file: label, I1..I13, C1..C26")
    criteo.add_argument("--out", required=True, help="dataset folder to create")
    criteo.add_argument("--table-size", type=int, default=100_000, help="hash range per table")
    criteo.add_argument("--table-sizes", type=int_list, help="26 comma-separated hash ranges")
    criteo.add_argument("--max-rows", type=int, help="read at most this many rows")
    criteo.add_argument("--overwrite", action="store_true")
    criteo.set_defaults(handler=cmd_data_criteo)

    train = stages.add_parser("train", help="train a DLRM and write a run folder")
    train.add_argument("--data", required=True, help="dataset folder")
    train.add_argument("--out", required=True, help="run folder to create, e.g. runs/NAME")
    train.add_argument("--embedding", choices=["full", "mlet"], default="full")
    train.add_argument("--dim", type=int, required=True, help="embedding width D")
    train.add_argument("--hidden", type=int, help="inner width K of a multi-layer table")
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

    export = stages.add_parser("export", help="collapse, lower to ONNX, write a model folder")
    export.add_argument("run", help="run folder written by `mlet train`")
    export.add_argument("--repo", required=True, help="model repository (Triton layout)")
    export.add_argument("--name", help="model name (default: the run folder's name)")
    export.add_argument("--max-batch-size", type=int, default=4096)
    export.add_argument("--replace", action="store_true", help="replace a different model")
    export.set_defaults(handler=cmd_export)

    serve = stages.add_parser("serve", help="serve a model repository (KServe v2 over HTTP)")
    serve.add_argument("--repo", help="model repository written by `mlet export`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models", type=name_list, help="load only these models at start")
    serve.add_argument(
        "--torch-run", type=named_run, action="append", default=[], metavar="NAME=RUN",
        help="also serve a training run with PyTorch (the uncollapsed model), as NAME",
    )  # fmt: skip
    serve.add_argument("--max-body-bytes", type=int, default=64 << 20, help="413 above this")
    batching = serve.add_argument_group("dynamic batching (default: each model's config.pbtxt)")
    batching.add_argument("--batching", choices=["config", "on", "off"], default="config")
    batching.add_argument("--max-queue-delay-us", type=int, help="longest wait for a batch")
    batching.add_argument("--preferred-batch-sizes", type=int_list, help="e.g. 64,256")
    batching.add_argument("--instances", type=int, help="batches run at once per model")
    batching.add_argument("--max-queue-rows", type=int, default=65536, help="503 above this")
    batching.add_argument(
        "--request-timeout", type=float, default=10.0, help="seconds a request may wait (0: none)"
    )
    runtime = serve.add_argument_group("ONNX Runtime session")
    runtime.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (0: cores / instances)"
    )
    runtime.add_argument("--inter-op-threads", type=int, default=1)
    runtime.add_argument("--no-memory-arena", action="store_true")
    runtime.add_argument(
        "--graph-optimization", choices=["disable", "basic", "extended", "all"], default="all"
    )
    runtime.add_argument(
        "--spin", action="store_true", help="let idle threads spin (lower latency, more CPU)"
    )
    runtime.add_argument(
        "--providers", type=name_list, default=["CPUExecutionProvider"],
        help="execution providers in order, e.g. CUDAExecutionProvider,CPUExecutionProvider",
    )  # fmt: skip
    serve.set_defaults(handler=cmd_serve)

    bench = stages.add_parser("bench", help="benchmarks").add_subparsers(dest="kind", required=True)
    load = bench.add_parser("load", help="Locust load test of served models")
    load.add_argument("--repo", required=True)
    load.add_argument("--models", type=name_list, required=True, help="comma-separated names")
    load.add_argument("--users", type=int, default=16)
    load.add_argument("--duration", type=float, default=10.0, help="seconds per model")
    load.add_argument("--rows", type=int, default=1, help="rows per request")
    load.add_argument("--binary", action="store_true", help="binary tensor extension")
    load.add_argument("--out", required=True, help="results folder")
    load.set_defaults(handler=cmd_bench_load)

    serve_bench = bench.add_parser("serve", help="batching on/off and server vs in-process")
    serve_bench.add_argument("--repo", required=True)
    serve_bench.add_argument("--model", required=True)
    serve_bench.add_argument("--users", type=int, default=64, help="users sending 1-row requests")
    serve_bench.add_argument("--rows", type=int, default=256, help="rows per large request")
    serve_bench.add_argument("--large-users", type=int, default=8)
    serve_bench.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    serve_bench.add_argument("--repetitions", type=int, default=3)
    serve_bench.add_argument("--out", required=True, help="results folder")
    serve_bench.set_defaults(handler=cmd_bench_serve)

    demo = stages.add_parser("demo", help="the whole pipeline on the synthetic default")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--rows", type=int, default=500_000)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
