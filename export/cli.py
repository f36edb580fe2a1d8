"""`mlet export`: a run folder -> models in a repository.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse

from mlet.arguments import name_list


def add_parser(stages) -> None:
    export = stages.add_parser("export", help="collapse, lower to ONNX, write a model folder")
    export.add_argument("run", help="run folder written by `mlet train`")
    export.add_argument("--repo", required=True, help="model repository (Triton layout)")
    export.add_argument("--name", help="model name (default: the run folder's name)")
    export.add_argument("--max-batch-size", type=int, default=4096)
    export.add_argument("--replace", action="store_true", help="replace a different model")
    export.add_argument(
        "--variants", type=name_list, default=["fp32"],
        help="fp32,fp16,int8,int4,trt,trt-fp16: each becomes a model NAME[-VARIANT]",
    )  # fmt: skip
    export.add_argument(
        "--max-auc-loss",
        type=float,
        default=None,
        help="refuse a variant losing more test AUC (default 0.001; int4 0.002)",
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
