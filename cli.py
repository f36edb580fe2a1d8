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


def int_pair(text: str) -> tuple[int, int]:
    values = int_list(text)
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive integers A,B, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def named_run(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_FOLDER, got {text!r}")
    return name, Path(path)


# -- data ------------------------------------------------------------------------------


def add_data(stages) -> None:
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

    movielens = data.add_parser("movielens", help="MovieLens-100k as click prediction")
    movielens.add_argument(
        "source", help="folder with u.data/u.user/u.item or ml-100k.*, or RecBole's wheel"
    )
    movielens.add_argument("--out", required=True, help="dataset folder to create")
    movielens.add_argument("--split", choices=["user-recent", "time"], default="user-recent")
    movielens.add_argument("--overwrite", action="store_true")
    movielens.set_defaults(handler=cmd_data_movielens)
    add_data_formats(data)


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


def cmd_data_movielens(args: argparse.Namespace) -> None:
    from mlet.data.movielens import convert

    schema = convert(args.source, args.out, split=args.split, overwrite=args.overwrite)
    print(
        f"wrote {schema.rows:,} rows to {args.out} ({schema.source['layout']} files, "
        f"positive rate {schema.source['positive_rate']:.3f}, split {args.split})"
    )


# -- study -----------------------------------------------------------------------------


def add_study(stages) -> None:
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
    )
    report = run_study_command(command)
    print(f"report: {report}")


# -- train -----------------------------------------------------------------------------


def add_train(stages) -> None:
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


# -- export ----------------------------------------------------------------------------


def add_export(stages) -> None:
    export = stages.add_parser("export", help="collapse, lower to ONNX, write a model folder")
    export.add_argument("run", help="run folder written by `mlet train`")
    export.add_argument("--repo", required=True, help="model repository (Triton layout)")
    export.add_argument("--name", help="model name (default: the run folder's name)")
    export.add_argument("--max-batch-size", type=int, default=4096)
    export.add_argument("--replace", action="store_true", help="replace a different model")
    export.add_argument(
        "--variants", type=name_list, default=["fp32"],
        help="fp32,fp16,int8,trt,trt-fp16: each becomes a model NAME[-VARIANT]",
    )  # fmt: skip
    export.add_argument(
        "--max-auc-loss", type=float, default=0.001, help="refuse a variant losing more test AUC"
    )
    export.add_argument(
        "--external-data-bytes", type=int, default=64 << 20,
        help="weights beyond this go to model.onnx.data, which ONNX Runtime maps",
    )  # fmt: skip
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from export.exporter import ExportConfig, export_variants, result_line

    config = ExportConfig(
        name=args.name,
        max_batch_size=args.max_batch_size,
        replace=args.replace,
        variants=tuple(args.variants),
        max_auc_loss=args.max_auc_loss,
        external_data_bytes=args.external_data_bytes,
    )
    report = export_variants(args.run, args.repo, config, log=print)
    for result in report.results:
        print(result_line(result))
    for variant, reason in report.skipped.items():
        print(f"skipped {variant}: {reason}")


# -- serve -----------------------------------------------------------------------------


def add_serve(stages) -> None:
    serve = stages.add_parser("serve", help="serve a model repository (KServe v2 over HTTP)")
    serve.add_argument("--repo", help="model repository written by `mlet export`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models", type=name_list, help="load only these models at start")
    serve.add_argument(
        "--torch-run", type=named_run, action="append", default=[], metavar="NAME=RUN",
        help="also serve a training run with PyTorch (the uncollapsed model), as NAME",
    )  # fmt: skip
    http = serve.add_argument_group("connections")
    http.add_argument("--max-body-bytes", type=int, default=64 << 20, help="413 above this")
    http.add_argument(
        "--max-connections", type=int,
        help="503 above this (default 1024, less where the descriptor limit is lower)",
    )  # fmt: skip
    http.add_argument("--header-timeout", type=float, default=10.0, help="seconds for headers")
    http.add_argument("--body-timeout", type=float, default=60.0, help="seconds for a body")
    http.add_argument("--keep-alive", type=float, default=5.0, help="idle seconds kept open")
    batching = serve.add_argument_group("dynamic batching (default: each model's config.pbtxt)")
    batching.add_argument("--batching", choices=["config", "on", "off"], default="config")
    batching.add_argument("--max-queue-delay-us", type=int, help="longest wait for a batch")
    batching.add_argument("--preferred-batch-sizes", type=int_list, help="e.g. 64,256")
    batching.add_argument("--instances", type=int, help="batches run at once per model")
    batching.add_argument("--max-queue-rows", type=int, default=65536, help="503 above this")
    batching.add_argument(
        "--inline-rows", type=int, default=64,
        help="batches of at most this many rows run on the event loop, not a thread (0: none)",
    )  # fmt: skip
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
    add_model_control_argument(serve)
    serve_engine_options(serve)
    serve.set_defaults(handler=cmd_serve)


def add_model_control_argument(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--model-control-mode", choices=["none", "explicit"], default="none",
        help="none: the models loaded at start stay; explicit: clients may load and unload",
    )  # fmt: skip


def add_bench_fuzz(bench) -> None:
    fuzz = bench.add_parser("fuzz", help="property-based fuzzing of the infer endpoint")
    fuzz.add_argument("--repo", required=True)
    fuzz.add_argument("--model", required=True)
    fuzz.add_argument("--cases", type=int, default=6000)
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--hang-seconds", type=float, default=10.0, help="longer counts as a hang")
    fuzz.add_argument("--out", help="write the figures to this JSON file")
    fuzz.set_defaults(handler=cmd_bench_fuzz)


def cmd_bench_fuzz(args: argparse.Namespace) -> None:
    from bench.fuzz import report_lines, run_fuzz
    from mlet.files import write_json

    report, seconds = run_fuzz(
        Path(args.repo), args.model, args.cases, args.hang_seconds, args.seed
    )
    print("\n".join(report_lines(report, seconds)))
    if args.out:
        write_json(args.out, report.to_dict() | {"seconds": seconds})
    if report.failures():
        raise SystemExit("fuzzing found faults:\n- " + "\n- ".join(report.failures()))


def cmd_serve(args: argparse.Namespace) -> None:
    from mlet.runtime import SessionOptions
    from serve.dataplane import BatchingOverrides, PlaneConfig
    from serve.http import HttpLimits, default_max_connections
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
        inline_rows=args.inline_rows,
    )
    if args.repo is None and not args.torch_run:
        raise ValueError("give a model repository (--repo) or a run (--torch-run NAME=RUN)")
    if args.engine == "triton":
        return serve_with_triton(args, session)
    run_server(
        ServerConfig(
            repo=Path(args.repo) if args.repo else None,
            host=args.host,
            port=args.port,
            models=args.models,
            plane=PlaneConfig(
                session=session,
                batching=batching,
                torch_runs=tuple(args.torch_run),
                model_control=args.model_control_mode,
            ),
            limits=HttpLimits(
                max_body_bytes=args.max_body_bytes,
                max_connections=args.max_connections or default_max_connections(),
                header_timeout_s=args.header_timeout,
                body_timeout_s=args.body_timeout,
                keep_alive_s=args.keep_alive,
            ),
        )
    )


# -- bench -----------------------------------------------------------------------------


def add_bench(stages) -> None:
    bench = stages.add_parser("bench", help="benchmarks").add_subparsers(dest="kind", required=True)
    add_bench_fuzz(bench)
    load = bench.add_parser("load", help="Locust load test of served models")
    load.add_argument("--repo", required=True)
    load.add_argument("--models", type=name_list, required=True, help="comma-separated names")
    load.add_argument("--users", type=int, default=16)
    load.add_argument("--duration", type=float, default=10.0, help="seconds per model")
    load.add_argument("--rows", type=int, default=1, help="rows per request")
    load.add_argument("--binary", action="store_true", help="binary tensor extension")
    load.add_argument("--sweep", action="store_true", help="step the users until saturation")
    load.add_argument("--repetitions", type=int, default=3, help="sweep repetitions")
    load.add_argument("--locust-processes", type=int, default=1, help="Locust worker processes")
    load.add_argument("--out", required=True, help="results folder")
    load.set_defaults(handler=cmd_bench_load)

    run = bench.add_parser("run", help="micro-benchmarks, load sweep and report in one run")
    model_options(run)
    run.add_argument("--baseline", help="model the others are compared with")
    run.add_argument("--compressed", type=name_list, help="models marked compressed")
    run.add_argument("--same-width", type=name_list, help="full tables at MLET's width")
    run.add_argument("--duration", type=float, default=8.0, help="seconds per step")
    run.add_argument("--locust-processes", type=int, default=1)
    run.add_argument("--study", help="a `mlet study` folder for the accuracy plot")
    run.add_argument("--out", help="results folder (default results/<UTC time>)")
    run.set_defaults(handler=cmd_bench_run)

    micro = bench.add_parser("micro", help="in-process latency, throughput and memory")
    model_options(micro)
    micro.add_argument("--out", required=True)
    micro.set_defaults(handler=cmd_bench_micro)

    report = bench.add_parser("report", help="report.md and report.html of a results folder")
    report.add_argument("results", help="folder written by `mlet bench run`")
    report.set_defaults(handler=cmd_bench_report)

    serve_bench = bench.add_parser("serve", help="batching on/off and server vs in-process")
    serve_bench.add_argument("--repo", required=True)
    serve_bench.add_argument("--model", required=True)
    serve_bench.add_argument("--users", type=int, default=64, help="users sending 1-row requests")
    serve_bench.add_argument("--rows", type=int, default=256, help="rows per large request")
    serve_bench.add_argument("--large-users", type=int, default=32)
    serve_bench.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    serve_bench.add_argument("--repetitions", type=int, default=3)
    serve_bench.add_argument("--out", required=True, help="results folder")
    serve_bench.set_defaults(handler=cmd_bench_serve)

    export_bench = bench.add_parser(
        "export", help="export a Criteo-Kaggle-sized MLET model: time, memory, session load"
    )
    export_bench.add_argument("--out", required=True, help="results folder")
    export_bench.add_argument("--work", help="where the 8.6 GB checkpoint and models go")
    export_bench.add_argument("--variants", type=name_list, default=["fp32"])
    export_bench.add_argument("--keep", action="store_true", help="keep checkpoint and models")
    export_bench.add_argument("--dim", type=int, default=16, help="D of the collapsed tables")
    export_bench.add_argument("--hidden", type=int, default=64, help="K of the MLET tables")
    export_bench.add_argument("--name", default="kaggle", help="model name in WORK/models")
    export_bench.set_defaults(handler=cmd_bench_export)

    int8_mlp = bench.add_parser("int8-mlp", help="int8 model: float32 vs quantized MLPs")
    int8_mlp.add_argument("--repo", required=True)
    int8_mlp.add_argument("--model", required=True, help="an int8 variant, e.g. NAME-int8")
    int8_mlp.add_argument("--out", required=True, help="results folder")
    int8_mlp.set_defaults(handler=cmd_bench_int8_mlp)
    add_bench_data(bench)
    add_engine_commands(bench, [load, run, serve_bench])


def model_options(command: argparse.ArgumentParser) -> None:
    """The models `bench run` and `bench micro` measure, and how often."""
    command.add_argument("--repo", required=True)
    command.add_argument("--models", type=name_list, required=True)
    command.add_argument("--torch-run", type=named_run, action="append", default=[],
                         metavar="NAME=RUN", help="also time a run in PyTorch")  # fmt: skip
    command.add_argument("--repetitions", type=int, default=3)
    command.add_argument("--quick", action="store_true", help="fewer batch sizes, shorter")


def cmd_bench_load(args: argparse.Namespace) -> None:
    if args.sweep:
        from bench.sweep import SweepConfig, run_sweep_command

        config = SweepConfig(duration=args.duration, repetitions=args.repetitions,
                             locust_processes=args.locust_processes,
                             engine=bench_engine(args))  # fmt: skip
        print(f"wrote {run_sweep_command(args.repo, args.models, config, Path(args.out))}")
        return
    from bench.load import LoadConfig, run_load

    config = LoadConfig(
        users=args.users,
        duration=args.duration,
        rows=args.rows,
        binary=args.binary,
        locust_processes=args.locust_processes,
        engine=bench_engine(args),
    )
    run_load(args.repo, args.models, config, args.out)
    print((Path(args.out) / "summary.md").read_text())


def micro_config(args: argparse.Namespace):
    from bench.micro import MicroConfig

    if args.quick:
        return MicroConfig(repetitions=args.repetitions, min_seconds=0.2, batch_sizes=(1, 64, 1024))
    return MicroConfig(repetitions=args.repetitions)


def compare_config(args: argparse.Namespace):
    from bench.compare import CompareConfig
    from bench.sweep import SweepConfig

    roles = {args.baseline: "baseline"} if args.baseline else {}
    for name in args.compressed or []:
        roles[name] = "compressed"
    for name in args.same_width or []:
        roles[name] = "same width"
    sweep = SweepConfig(
        duration=args.duration,
        repetitions=args.repetitions,
        locust_processes=args.locust_processes,
        engine=bench_engine(args),
    )
    return CompareConfig(
        micro=micro_config(args),
        sweep=sweep,
        roles=roles,
        torch_runs=tuple(args.torch_run),
        study=Path(args.study) if args.study else None,
    )


def cmd_bench_run(args: argparse.Namespace) -> None:
    from bench.compare import default_results_folder, run_comparison

    out = Path(args.out) if args.out else default_results_folder()
    report = run_comparison(args.repo, args.models, compare_config(args), out)
    print((out / "report.md").read_text().split("## ")[0])
    print(f"report: {report}")


def cmd_bench_micro(args: argparse.Namespace) -> None:
    from bench.micro import Target, micro_lines, run_micro_command

    targets = [Target(m, Path(args.repo) / m) for m in args.models]
    targets += [Target(name, path, "pytorch") for name, path in args.torch_run]
    results = run_micro_command(targets, micro_config(args), Path(args.out))
    print("\n".join(micro_lines(results)))


def cmd_bench_report(args: argparse.Namespace) -> None:
    from bench.report import build_report

    md, page = build_report(args.results)
    print(f"wrote {md} and {page}")


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from bench.serve_bench import ServeBenchConfig, run_serve_bench

    config = ServeBenchConfig(
        small_users=args.users,
        large_rows=args.rows,
        large_users=args.large_users,
        duration=args.duration,
        repetitions=args.repetitions,
        engine=bench_engine(args),
    )
    run_serve_bench(args.repo, args.model, config, args.out)
    print((Path(args.out) / "serve.md").read_text())


def cmd_bench_export(args: argparse.Namespace) -> None:
    from bench.export_bench import ExportBenchConfig, run_export_bench

    config = ExportBenchConfig(
        dim=args.dim,
        hidden=args.hidden,
        variants=tuple(args.variants),
        keep=args.keep,
        name=args.name,
    )
    if args.work:
        config.work = Path(args.work)
    run_export_bench(config, Path(args.out))
    print((Path(args.out) / "export.md").read_text())


def cmd_bench_int8_mlp(args: argparse.Namespace) -> None:
    from bench.export_bench import run_int8_mlp_bench

    run_int8_mlp_bench(Path(args.repo), args.model, Path(args.out))
    print((Path(args.out) / "int8_mlp.md").read_text())


# -- serving engines: ours or real Triton ------------------------------------------------

ENGINE_HELP = "mlet (ours) or triton (real Triton Inference Server)"
TRITONSERVER_HELP = "tritonserver binary (default: on PATH, else .venv-triton's)"


def serve_engine_options(serve) -> None:
    serve.add_argument("--engine", choices=["mlet", "triton"], default="mlet", help=ENGINE_HELP)
    serve.add_argument("--tritonserver", help=TRITONSERVER_HELP)


def serve_with_triton(args: argparse.Namespace, session) -> None:
    from serve.triton_engine import TritonConfig, run_triton

    if args.torch_run or not args.repo:
        raise ValueError("--engine triton serves a model repository (--repo), not --torch-run")
    overrides = (args.batching != "config", args.max_queue_delay_us, args.preferred_batch_sizes,
                 args.instances)  # fmt: skip
    if any(o not in (None, False) for o in overrides):
        raise ValueError("batching options apply to --engine mlet; Triton batches as "
                         "each model's config.pbtxt says")  # fmt: skip
    config = TritonConfig(
        repo=Path(args.repo), host=args.host, port=args.port, models=args.models,
        tritonserver=Path(args.tritonserver) if args.tritonserver else None, session=session,
    )  # fmt: skip
    code = run_triton(config)
    if code:
        raise SystemExit(code)


def add_engine_commands(bench, load_commands: list) -> None:
    """--engine and --url on the load benchmarks; `mlet bench engines`."""
    for command in load_commands:
        serve_engine_options(command)
        command.add_argument("--url", help="load an already running KServe v2 server instead")
    engines = bench.add_parser("engines", help="our server and Triton, same model, same load")
    engines.add_argument("--repo", required=True)
    engines.add_argument("--model", required=True)
    engines.add_argument("--engines", type=name_list, default=["mlet", "triton"])
    engines.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    engines.add_argument("--rounds", type=int, default=4,
                         help="each load in rounds that alternate the engines")  # fmt: skip
    engines.add_argument("--connections", type=int, default=32)
    engines.add_argument("--generator", choices=["auto", "wrk", "locust"], default="auto")
    engines.add_argument("--locust-processes", type=int, default=2, help="without wrk")
    engines.add_argument("--tritonserver", help=TRITONSERVER_HELP)
    engines.add_argument(
        "--no-batching-off", action="store_true", help="skip our server with batching off"
    )
    engines.add_argument("--out", required=True, help="results folder")
    engines.set_defaults(handler=cmd_bench_engines)


def bench_engine(args: argparse.Namespace):
    from bench.engines import engine_from_args

    return engine_from_args(args.engine, args.url, args.tritonserver)


def cmd_bench_engines(args: argparse.Namespace) -> None:
    from bench.engines import EnginesConfig, run_engines

    config = EnginesConfig(
        engines=tuple(args.engines), duration=args.duration, connections=args.connections,
        generator=args.generator, locust_processes=args.locust_processes,
        tritonserver=args.tritonserver, batching_off=not args.no_batching_off,
        rounds=args.rounds,
    )  # fmt: skip
    run_engines(args.repo, args.model, config, args.out)
    print((Path(args.out) / "engines.md").read_text())


# -- demo ------------------------------------------------------------------------------


def add_demo(stages) -> None:
    demo = stages.add_parser("demo", help="the whole pipeline on the synthetic default")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--rows", type=int, default=500_000)
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=Path(args.out), rows=args.rows))
    print(f"report: {report}")


# --- Data in: raw files -> dataset folders, raw rows -> probabilities, the data benchmark ---


def convert_config(args: argparse.Namespace, tables: int):
    from mlet.data.engine import ConvertConfig

    sizes = getattr(args, "table_sizes", None)
    if getattr(args, "table_size", None) and not sizes:
        sizes = (args.table_size,) * tables
    hashed = args.hash is not None or sizes is not None
    if sizes and len(sizes) != tables:
        raise ValueError(f"--table-sizes needs {tables} sizes, got {len(sizes)}")
    return ConvertConfig(
        encoding="hash" if hashed else "vocab",
        min_count=args.min_count,
        hash_size=args.hash or 100_000,
        hash_sizes=tuple(sizes or ()),
        hotness=getattr(args, "hotness", 1),
        max_rows=args.max_rows,
        workers=args.workers,
    )


def source_format(args: argparse.Namespace):
    from mlet.data import formats

    if args.source == "criteo":
        return formats.criteo_format()
    if args.source == "avazu":
        return formats.avazu_format(formats.file_columns(Path(args.files[0]), formats.CSV_HEADER))
    return formats.csv_format(
        Path(args.files[0]), label=args.label, dense=args.dense or [],
        categorical=args.categorical or [], multi_hot=dict(args.multi_hot),
        columns=args.columns, delimiter=args.delimiter, dense_transform=args.dense_transform,
    )  # fmt: skip


def cmd_data_convert(args: argparse.Namespace) -> None:
    from mlet.data.engine import convert
    from mlet.data.summary import format_summary

    fmt = source_format(args)
    config = convert_config(args, len(fmt.table_names))
    schema = convert(args.files, fmt, args.out, config, overwrite=args.overwrite)
    print(format_summary(schema.source["summary"]))
    print(f"wrote {schema.rows:,} rows to {args.out}")


def multi_hot(text: str) -> tuple[str, str]:
    column, sep, separator = text.partition(":")
    if not sep or not column or not separator:
        raise argparse.ArgumentTypeError(f"expected COLUMN:SEPARATOR, got {text!r}")
    return column, separator


def cmd_predict(args: argparse.Namespace) -> None:
    from predict.predict import PredictConfig, predict_files

    config = PredictConfig(url=args.url, request_rows=args.request_rows, threads=args.threads)
    result = predict_files(args.model, args.files, args.out, config)
    print(f"wrote {result.rows:,} probabilities to {args.out} ({result.seconds:.1f} s, "
          f"{result.oov_share:.1%} of values out of vocabulary)")  # fmt: skip


def cmd_bench_data(args: argparse.Namespace) -> None:
    from bench.data_bench import DataBenchConfig, run_data_bench

    config = DataBenchConfig(
        rows=args.rows, memory_rows=tuple(args.memory_rows), repetitions=args.repetitions
    )
    run_data_bench(config, Path(args.out), Path(args.work) if args.work else None)
    print((Path(args.out) / "data.md").read_text())


def add_bench_data(bench) -> None:
    """`mlet bench data`."""
    command = bench.add_parser("data", help="conversion speed and memory: old vs new reader")
    command.add_argument("--rows", type=int, default=1_000_000, help="rows of the test file")
    command.add_argument("--memory-rows", type=int_list, default=[1_000_000, 4_000_000],
                         help="file lengths whose peak memory is measured")  # fmt: skip
    command.add_argument("--repetitions", type=int, default=3, help="interleaved rounds")
    command.add_argument("--work", help="where the generated files go (default: a temp dir)")
    command.add_argument("--out", required=True, help="results folder")
    command.set_defaults(handler=cmd_bench_data)


def add_data_formats(data) -> None:
    """`mlet data criteo|avazu|csv`: the conversion engine's front doors."""
    helps = {
        "criteo": "Criteo TSV files (.gz accepted), e.g. day_0 .. day_23 in order",
        "avazu": "Avazu CSV files with header (.gz accepted)",
        "csv": "any CSV, TSV or Parquet file: name the label, dense and categorical columns",
    }
    for name, text in helps.items():
        command = data.add_parser(name, help=text)
        command.add_argument("files", nargs="+", help="input files, read in order as one")
        command.add_argument("--out", required=True, help="dataset folder to create")
        encoding = command.add_mutually_exclusive_group()
        encoding.add_argument("--vocab", action="store_true",
                              help="vocabularies of the training rows (the default)")  # fmt: skip
        encoding.add_argument("--hash", type=int, metavar="SIZE", help="hash into SIZE rows")
        command.add_argument("--min-count", type=int, default=1,
                             help="rarer values share the out-of-vocabulary row")  # fmt: skip
        command.add_argument("--max-rows", type=int, help="read at most this many rows")
        command.add_argument("--workers", type=int, default=0,
                             help="threads parsing parts of files (0: one per core)")  # fmt: skip
        command.add_argument("--overwrite", action="store_true")
        command.set_defaults(handler=cmd_data_convert)
        if name == "criteo":
            encoding.add_argument("--table-size", type=int, help="hash range per table")
            encoding.add_argument("--table-sizes", type=int_list, help="26 hash ranges")
        if name == "csv":
            command.add_argument("--label", help="the 0/1 label column")
            command.add_argument("--dense", type=name_list, help="numeric columns")
            command.add_argument("--categorical", type=name_list, help="one table each")
            command.add_argument("--multi-hot", type=multi_hot, action="append", default=[],
                                 metavar="COL:SEP", help="a categorical column of SEP-joined "
                                 "values (summed); give --hotness")  # fmt: skip
            command.add_argument("--hotness", type=int, default=1, help="values kept per row")
            command.add_argument(
                "--columns", type=name_list, help="names, for files without header"
            )
            command.add_argument("--delimiter", help="default: tab for .tsv, else comma")
            command.add_argument(
                "--dense-transform", choices=["log1p", "identity"], default="log1p"
            )


def add_predict(stages) -> None:
    """`mlet predict`: raw rows -> probabilities with an exported model."""
    predict = stages.add_parser("predict", help="score raw rows with an exported model")
    predict.add_argument("model", help="model folder, e.g. models/NAME (from `mlet export`)")
    predict.add_argument("files", nargs="+", help="raw rows in the format the model was trained on")
    predict.add_argument("--out", required=True, help="output .csv or .parquet")
    predict.add_argument("--url", help="a KServe v2 server, e.g. http://127.0.0.1:8000")
    predict.add_argument("--request-rows", type=int, default=1024, help="rows per model call")
    predict.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    predict.set_defaults(handler=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlet", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="command", required=True)
    for add_stage in (
        add_data,
        add_train,
        add_study,
        add_export,
        add_serve,
        add_bench,
        add_demo,
        add_predict,
    ):
        add_stage(stages)
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
