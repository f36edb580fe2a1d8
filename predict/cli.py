"""`mlet predict`: raw rows -> probabilities with an exported model.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse


def add_parser(stages) -> None:
    """`mlet predict`: raw rows -> probabilities with an exported model."""
    predict = stages.add_parser("predict", help="score raw rows with an exported model")
    predict.add_argument("model", help="model folder, e.g. models/NAME (from `mlet export`)")
    predict.add_argument("files", nargs="+", help="raw rows in the format the model was trained on")
    predict.add_argument("--out", required=True, help="output .csv or .parquet")
    predict.add_argument("--url", help="a KServe v2 server, e.g. http://127.0.0.1:8000 "
                         "(gRPC: 127.0.0.1:8001)")  # fmt: skip
    predict.add_argument("--protocol", choices=["http", "grpc"], default="http",
                         help="how to reach --url (default http)")  # fmt: skip
    predict.add_argument("--raw", action="store_true",
                         help="with --url: send the logged columns to NAME-raw")  # fmt: skip
    predict.add_argument("--request-rows", type=int, default=1024, help="rows per model call")
    predict.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    predict.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> None:
    from predict.predict import PredictConfig, predict_files

    config = PredictConfig(
        url=args.url, request_rows=args.request_rows, threads=args.threads, raw=args.raw,
        protocol=args.protocol,
    )  # fmt: skip
    result = predict_files(args.model, args.files, args.out, config)
    print(f"wrote {result.rows:,} probabilities to {args.out} ({result.seconds:.1f} s, "
          f"{result.oov_share:.1%} of values out of vocabulary)")  # fmt: skip
