"""`mlet serve`: a model repository over KServe v2 (HTTP, and gRPC when asked), on our
server or real Triton.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlet.arguments import int_list, name_list, named_run


def add_parser(stages) -> None:
    serve = stages.add_parser(
        "serve", help="serve a model repository (KServe v2 over HTTP, and gRPC when asked)"
    )
    serve.add_argument("--repo", help="model repository written by `mlet export`")
    serve.add_argument("--host", default="127.0.0.1", help="address of HTTP and gRPC")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument(
        "--grpc-port", type=int,
        help="also serve KServe v2 gRPC (inference.GRPCInferenceService) here (default: off)",
    )  # fmt: skip
    serve.add_argument("--models", type=name_list, help="load only these models at start")
    serve.add_argument(
        "--torch-run", type=named_run, action="append", default=[], metavar="NAME=RUN",
        help="also serve a training run with PyTorch (the uncollapsed model), as NAME",
    )  # fmt: skip
    http = serve.add_argument_group("connections")
    http.add_argument(
        "--max-body-bytes", type=int, default=64 << 20,
        help="413 above this (gRPC: RESOURCE_EXHAUSTED above this many message bytes)",
    )  # fmt: skip
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
        help="batches of at most this many rows run on the event loop, not a thread (0: none;"
        " with --grpc-port a raw-row transform step's never do)",
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


ENGINE_HELP = "mlet (ours) or triton (real Triton Inference Server)"


TRITONSERVER_HELP = "tritonserver binary (default: on PATH, else .venv-triton's)"


def serve_engine_options(serve) -> None:
    serve.add_argument("--engine", choices=["mlet", "triton"], default="mlet", help=ENGINE_HELP)
    serve.add_argument("--tritonserver", help=TRITONSERVER_HELP)


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
        transform_inline=args.grpc_port is None,
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
            grpc_port=args.grpc_port,
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
        repo=Path(args.repo), host=args.host, port=args.port, grpc_port=args.grpc_port,
        models=args.models,
        tritonserver=Path(args.tritonserver) if args.tritonserver else None, session=session,
    )  # fmt: skip
    code = run_triton(config)
    if code:
        raise SystemExit(code)
