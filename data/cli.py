"""`mlet data`: raw files and generators -> dataset folders.

Stage code is imported inside the handlers, so the parser stays cheap to build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlet.arguments import int_list, name_list


def add_parser(stages) -> None:
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
    from data.synthetic import SyntheticConfig, generate

    options = {"rows": args.rows, "seed": args.seed, "hotness": args.hotness}
    if args.table_sizes:
        options["table_sizes"] = args.table_sizes
    schema = generate(SyntheticConfig(**options), args.out, overwrite=args.overwrite)
    print(
        f"wrote {schema.rows:,} rows to {args.out} (positive rate "
        f"{schema.source['positive_rate']:.3f}, oracle AUC {schema.source['oracle_auc']:.4f})"
    )


def cmd_data_movielens(args: argparse.Namespace) -> None:
    from data.movielens import convert

    schema = convert(args.source, args.out, split=args.split, overwrite=args.overwrite)
    print(
        f"wrote {schema.rows:,} rows to {args.out} ({schema.source['layout']} files, "
        f"positive rate {schema.source['positive_rate']:.3f}, split {args.split})"
    )


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


def multi_hot(text: str) -> tuple[str, str]:
    column, sep, separator = text.partition(":")
    if not sep or not column or not separator:
        raise argparse.ArgumentTypeError(f"expected COLUMN:SEPARATOR, got {text!r}")
    return column, separator


def convert_config(args: argparse.Namespace, tables: int):
    from data.engine import ConvertConfig

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
    from data import formats
    from mlet.formats import file_columns

    if args.source == "criteo":
        return formats.criteo_format()
    if args.source == "avazu":
        return formats.avazu_format(file_columns(Path(args.files[0]), formats.CSV_HEADER))
    return formats.csv_format(
        Path(args.files[0]), label=args.label, dense=args.dense or [],
        categorical=args.categorical or [], multi_hot=dict(args.multi_hot),
        columns=args.columns, delimiter=args.delimiter, dense_transform=args.dense_transform,
    )  # fmt: skip


def cmd_data_convert(args: argparse.Namespace) -> None:
    from data.engine import convert
    from data.summary import format_summary

    fmt = source_format(args)
    config = convert_config(args, len(fmt.table_names))
    schema = convert(args.files, fmt, args.out, config, overwrite=args.overwrite)
    print(format_summary(schema.source["summary"]))
    print(f"wrote {schema.rows:,} rows to {args.out}")
