"""`mlet bench`: load tests, engines, in-process and stage benchmarks, reports, fuzzing.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlet.arguments import int_list, name_list, named_run
from serve.cli import TRITONSERVER_HELP, serve_engine_options


def add_parser(stages) -> None:
    bench = stages.add_parser("bench", help="benchmarks").add_subparsers(dest="kind", required=True)
    add_bench_fuzz(bench)
    load = bench.add_parser("load", help="Locust load test of served models")
    load.add_argument("--repo", required=True)
    load.add_argument("--models", type=name_list, required=True, help="comma-separated names")
    load.add_argument("--users", type=int, default=16)
    load.add_argument("--duration", type=float, default=10.0, help="seconds per model")
    load.add_argument("--rows", type=int, default=1, help="rows per request")
    load.add_argument("--binary", action="store_true", help="binary tensor extension")
    protocol_options(load, "Locust's HTTP or gRPC user")
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
    serve_bench.add_argument("--protocol", choices=["http", "grpc"], default="http",
                             help="KServe v2 over HTTP or gRPC (Locust's users)")  # fmt: skip
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

    add_bench_train(bench)
    int8_mlp = bench.add_parser("int8-mlp", help="int8 model: float32 vs quantized MLPs")
    int8_mlp.add_argument("--repo", required=True)
    int8_mlp.add_argument("--model", required=True, help="an int8 variant, e.g. NAME-int8")
    int8_mlp.add_argument("--out", required=True, help="results folder")
    int8_mlp.set_defaults(handler=cmd_bench_int8_mlp)
    add_bench_data(bench)
    add_bench_scale(bench)
    int4 = bench.add_parser("int4-gather", help="4-bit row gathers: ours vs GatherBlockQuantized")
    int4.add_argument("--rows", type=int, default=10_131_227, help="rows of the table")
    int4.add_argument("--dim", type=int, default=16, help="D (at least 16 for the contrib op)")
    int4.add_argument("--out", required=True, help="results folder")
    int4.set_defaults(handler=cmd_bench_int4_gather)
    add_engine_commands(bench, [load, run, serve_bench])


def model_options(command: argparse.ArgumentParser) -> None:
    """The models `bench run` and `bench micro` measure, and how often."""
    command.add_argument("--repo", required=True)
    command.add_argument("--models", type=name_list, required=True)
    command.add_argument("--torch-run", type=named_run, action="append", default=[],
                         metavar="NAME=RUN", help="also time a run in PyTorch")  # fmt: skip
    command.add_argument("--repetitions", type=int, default=3)
    command.add_argument("--quick", action="store_true", help="fewer batch sizes, shorter")


def protocol_options(command: argparse.ArgumentParser, how: str) -> None:
    """--protocol and --raw of the load commands."""
    command.add_argument("--protocol", choices=["http", "grpc"], default="http",
                         help=f"KServe v2 over HTTP or gRPC ({how})")  # fmt: skip
    command.add_argument("--raw", action="store_true",
                         help="logged columns to MODEL-raw (needs a model exported with its "
                         "transform)")  # fmt: skip


def add_engine_commands(bench, load_commands: list) -> None:
    """--engine and --url on the load benchmarks; `mlet bench engines`."""
    for command in load_commands:
        serve_engine_options(command)
        command.add_argument("--url", help="load an already running KServe v2 server instead")
    load_commands[0].add_argument("--grpc-url", help="with --url and --protocol grpc: its "
                                  "gRPC endpoint, host:port")  # fmt: skip
    engines = bench.add_parser("engines", help="our server and Triton, same model, same load")
    engines.add_argument("--repo", required=True)
    engines.add_argument("--model", required=True)
    engines.add_argument("--engines", type=name_list, default=["mlet", "triton"])
    engines.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    engines.add_argument("--rounds", type=int, default=4,
                         help="each load in rounds that alternate the engines")  # fmt: skip
    engines.add_argument("--connections", type=int, default=32)
    engines.add_argument("--generator", choices=["auto", "wrk", "h2load", "locust"],
                         default="auto", help="auto: wrk over HTTP, h2load over gRPC")  # fmt: skip
    protocol_options(engines, "wrk or h2load")
    engines.add_argument("--locust-processes", type=int, default=2, help="without wrk")
    engines.add_argument("--tritonserver", help=TRITONSERVER_HELP)
    engines.add_argument(
        "--no-batching-off", action="store_true", help="skip our server with batching off"
    )
    engines.add_argument("--out", required=True, help="results folder")
    engines.set_defaults(handler=cmd_bench_engines)


def add_bench_train(bench) -> None:
    """`mlet bench train`."""
    command = bench.add_parser(
        "train", help="the TorchRec trainer against the loop before it; memory; resume"
    )
    command.add_argument("--out", required=True, help="results folder")
    command.add_argument("--work", help="where generated data, runs and the worktree go")
    command.add_argument("--baseline", default="5173b20",
                         help="commit whose trainer to compare with ('' for none)")  # fmt: skip
    command.add_argument("--steps", type=int, default=100, help="timed steps per round")
    command.add_argument("--rounds", type=int, default=5, help="step rounds per trainer, in turns")
    command.add_argument("--quick", action="store_true",
                         help="small tables, no Kaggle-size memory run (for tests)")  # fmt: skip
    command.set_defaults(handler=cmd_bench_train)


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


def add_bench_scale(bench) -> None:
    """`mlet bench scale`."""
    from bench.load.scale import MODELS

    command = bench.add_parser(
        "scale", help="Criteo-Kaggle-size models, compressed against uncompressed, served"
    )
    command.add_argument("--out", help="results folder (default results/<UTC time>)")
    command.add_argument("--work", help="where data, runs and the model repository go")
    command.add_argument("--engines", type=name_list, default=["mlet", "triton"])
    command.add_argument("--variants", type=name_list, default=list(MODELS),
                         help=f"models among {','.join(MODELS)}")  # fmt: skip
    command.add_argument("--ids", type=name_list, help="uniform,zipf[,dataset] (default: "
                         "uniform,zipf, and dataset with --ids-from)")  # fmt: skip
    command.add_argument("--seconds", type=float, help="seconds per load (default 10)")
    command.add_argument("--connections", type=int, help="wrk connections (default 16)")
    command.add_argument("--zipf-from", help="a converted dataset to fit the Zipf exponent on")
    command.add_argument("--zipf-exponent", type=float, help="the exponent itself instead")
    command.add_argument("--ids-from", help="a converted dataset whose id frequencies to replay")
    command.add_argument("--train-rows", type=int, help="generated rows the runs train on")
    command.add_argument("--tritonserver", help=TRITONSERVER_HELP)
    command.add_argument("--keep-runs", action="store_true", help="keep the checkpoints")
    command.add_argument("--quick", action="store_true",
                         help="tables 100x smaller, short loads (for tests)")  # fmt: skip
    command.set_defaults(handler=cmd_bench_scale)


def add_bench_fuzz(bench) -> None:
    fuzz = bench.add_parser("fuzz", help="property-based fuzzing of the infer endpoint")
    fuzz.add_argument("--repo", required=True)
    fuzz.add_argument("--model", required=True)
    fuzz.add_argument("--cases", type=int, default=6000)
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--hang-seconds", type=float, default=10.0, help="longer counts as a hang")
    fuzz.add_argument("--out", help="write the figures to this JSON file")
    fuzz.add_argument(
        "--rows-from",
        help="a logged file (CSV, TSV or Parquet) whose values a <model>-raw fuzz draws from",
    )
    fuzz.set_defaults(handler=cmd_bench_fuzz)


def bench_engine(args: argparse.Namespace):
    from bench.load.servers import engine_from_args

    return engine_from_args(
        args.engine, args.url, args.tritonserver, getattr(args, "grpc_url", None)
    )


def micro_config(args: argparse.Namespace):
    from bench.inprocess.micro import MicroConfig

    if args.quick:
        return MicroConfig(repetitions=args.repetitions, min_seconds=0.2, batch_sizes=(1, 64, 1024))
    return MicroConfig(repetitions=args.repetitions)


def compare_config(args: argparse.Namespace):
    from bench.load.sweep import SweepConfig
    from bench.report.compare import CompareConfig

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


def cmd_bench_load(args: argparse.Namespace) -> None:
    if args.sweep:
        from bench.load.sweep import SweepConfig, request_kinds, run_sweep_command

        config = SweepConfig(kinds=request_kinds(args.protocol, args.raw), duration=args.duration,
                             repetitions=args.repetitions, locust_processes=args.locust_processes,
                             engine=bench_engine(args), protocol=args.protocol,
                             raw=args.raw)  # fmt: skip
        print(f"wrote {run_sweep_command(args.repo, args.models, config, Path(args.out))}")
        return
    from bench.load.load_test import LoadConfig, run_load

    config = LoadConfig(
        users=args.users,
        duration=args.duration,
        rows=args.rows,
        binary=args.binary,
        locust_processes=args.locust_processes,
        engine=bench_engine(args),
        protocol=args.protocol,
        raw=args.raw,
    )
    run_load(args.repo, args.models, config, args.out)
    print((Path(args.out) / "summary.md").read_text())


def cmd_bench_run(args: argparse.Namespace) -> None:
    from bench.report.compare import default_results_folder, run_comparison

    out = Path(args.out) if args.out else default_results_folder()
    report = run_comparison(args.repo, args.models, compare_config(args), out)
    print((out / "report.md").read_text().split("## ")[0])
    print(f"report: {report}")


def cmd_bench_micro(args: argparse.Namespace) -> None:
    from bench.inprocess.micro import Target, micro_lines, run_micro_command

    targets = [Target(m, Path(args.repo) / m) for m in args.models]
    targets += [Target(name, path, "pytorch") for name, path in args.torch_run]
    results = run_micro_command(targets, micro_config(args), Path(args.out))
    print("\n".join(micro_lines(results)))


def cmd_bench_report(args: argparse.Namespace) -> None:
    from bench.report.report import build_report

    md, page = build_report(args.results)
    print(f"wrote {md} and {page}")


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from bench.load.serve_bench import ServeBenchConfig, run_serve_bench

    config = ServeBenchConfig(
        small_users=args.users,
        large_rows=args.rows,
        large_users=args.large_users,
        duration=args.duration,
        repetitions=args.repetitions,
        engine=bench_engine(args),
        protocol=args.protocol,
    )
    run_serve_bench(args.repo, args.model, config, args.out)
    print((Path(args.out) / "serve.md").read_text())


def cmd_bench_export(args: argparse.Namespace) -> None:
    from bench.inprocess.export_bench import ExportBenchConfig, run_export_bench

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


def cmd_bench_train(args: argparse.Namespace) -> None:
    from bench.inprocess.train_bench import TrainBenchConfig, run_train_bench

    config = TrainBenchConfig(baseline=args.baseline or None, steps=args.steps, rounds=args.rounds)
    if args.quick:
        config.speed_rows, config.speed_data_rows, config.memory = 1000, 4000, False
        config.warmup_steps, config.dim, config.hidden = 2, 4, 8
        config.loop_repeats = 1
    if args.work:
        config.work = Path(args.work)
    run_train_bench(config, Path(args.out))
    print((Path(args.out) / "train.md").read_text())


def cmd_bench_int8_mlp(args: argparse.Namespace) -> None:
    from bench.inprocess.export_bench import run_int8_mlp_bench

    run_int8_mlp_bench(Path(args.repo), args.model, Path(args.out))
    print((Path(args.out) / "int8_mlp.md").read_text())


def cmd_bench_engines(args: argparse.Namespace) -> None:
    from bench.load.engines import EnginesConfig, run_engines

    config = EnginesConfig(
        engines=tuple(args.engines), duration=args.duration, connections=args.connections,
        generator=args.generator, locust_processes=args.locust_processes,
        tritonserver=args.tritonserver, batching_off=not args.no_batching_off,
        rounds=args.rounds, protocol=args.protocol, raw=args.raw,
    )  # fmt: skip
    run_engines(args.repo, args.model, config, args.out)
    print((Path(args.out) / "engines.md").read_text())


def cmd_bench_scale(args: argparse.Namespace) -> None:
    from bench.load.scale import ScaleConfig, quick_config, run_scale
    from bench.report.compare import default_results_folder

    options = {
        "engines": tuple(args.engines),
        "variants": tuple(args.variants),
        "ids": tuple(args.ids or ["uniform", "zipf", *(["dataset"] if args.ids_from else [])]),
        "seconds": args.seconds,
        "connections": args.connections,
        "zipf_from": Path(args.zipf_from) if args.zipf_from else None,
        "zipf_exponent": args.zipf_exponent,
        "ids_from": Path(args.ids_from) if args.ids_from else None,
        "train_rows": args.train_rows,
        "tritonserver": args.tritonserver,
        "keep_runs": args.keep_runs,
        "work": Path(args.work) if args.work else None,
    }
    options = {key: value for key, value in options.items() if value is not None}
    config = quick_config(**options) if args.quick else ScaleConfig(**options)
    out = Path(args.out) if args.out else default_results_folder()
    run_scale(config, out)
    print((out / "scale.md").read_text())
    print(f"wrote {out / 'scale.json'} and {out / 'scale.html'}")


def cmd_bench_int4_gather(args: argparse.Namespace) -> None:
    from bench.inprocess.int4_gather import Int4GatherConfig, run_int4_gather_bench

    report = run_int4_gather_bench(Int4GatherConfig(rows=args.rows, dim=args.dim), Path(args.out))
    for name, ms in report["median_ms_per_call"].items():
        print(f"{name}: {ms:.3f} ms per gather of {report['config']['batch']} rows")
    print(f"GatherBlockQuantized / ours: {report['contrib_over_ours']:.2f}x "
          f"(max difference {report['max_abs_diff']:.2e})")  # fmt: skip


def cmd_bench_data(args: argparse.Namespace) -> None:
    from bench.inprocess.data_bench import DataBenchConfig, run_data_bench

    config = DataBenchConfig(
        rows=args.rows, memory_rows=tuple(args.memory_rows), repetitions=args.repetitions
    )
    run_data_bench(config, Path(args.out), Path(args.work) if args.work else None)
    print((Path(args.out) / "data.md").read_text())


def cmd_bench_fuzz(args: argparse.Namespace) -> None:
    from mlet.files import write_json
    from mlet.raw_rows import RAW_SUFFIX
    from serve.fuzz import report_lines, run_fuzz
    from serve.fuzz_raw import run_raw_fuzz

    if args.model.endswith(RAW_SUFFIX):  # logged columns, over HTTP and gRPC
        rows_from = Path(args.rows_from) if args.rows_from else None
        report, seconds = run_raw_fuzz(
            Path(args.repo), args.model, args.cases, args.hang_seconds, args.seed, rows_from
        )
    else:
        report, seconds = run_fuzz(
            Path(args.repo), args.model, args.cases, args.hang_seconds, args.seed
        )
    print("\n".join(report_lines(report, seconds)))
    if args.out:
        write_json(args.out, report.to_dict() | {"seconds": seconds})
    if report.failures():
        raise SystemExit("fuzzing found faults:\n- " + "\n- ".join(report.failures()))
