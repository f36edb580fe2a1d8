"""The front doors: which columns of Criteo, Avazu and any CSV/Parquet file are what.

criteo   TSV, no header: label, I1..I13 (counts), C1..C26 (32-bit hex hashes)
avazu    the Kaggle CSV with header: id (dropped), click (label), hour (YYMMDDHH,
         split into hour_of_day and day_of_week tables), every other column a table
csv      any CSV/TSV/Parquet file: --label, --dense, --categorical, --multi-hot
"""

from __future__ import annotations

from pathlib import Path

from mlet.formats import AVAZU_HOUR, DataFormatError, SourceFormat

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_TABLES = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label", *CRITEO_DENSE, *CRITEO_TABLES)


def criteo_format() -> SourceFormat:
    return SourceFormat(
        kind="criteo", label="label", dense=CRITEO_DENSE, categorical=CRITEO_TABLES,
        delimiter="\t", header=False, columns=CRITEO_COLUMNS, keys="hex",
    )  # fmt: skip


def avazu_format(header: list[str]) -> SourceFormat:
    """Avazu's columns from its header: everything but id, click and hour is a table."""
    missing = [c for c in ("id", "click", AVAZU_HOUR) if c not in header]
    if missing:
        raise DataFormatError(f"not an Avazu header: no column {', '.join(missing)} in {header}")
    tables = tuple(c for c in header if c not in ("id", "click", AVAZU_HOUR))
    return SourceFormat(
        kind="avazu", label="click", categorical=tables, hour=AVAZU_HOUR, dense_transform="identity"
    )


CSV_HEADER = SourceFormat(kind="csv", label=None)  # reads a comma-separated header


def csv_format(
    path: Path,
    label: str | None,
    dense: list[str],
    categorical: list[str],
    multi_hot: dict[str, str] | None = None,
    columns: list[str] | None = None,
    delimiter: str | None = None,
    dense_transform: str = "log1p",
) -> SourceFormat:
    """A generic CSV/TSV/Parquet format: header names, or `columns` when there is none."""
    multi_hot = dict(multi_hot or {})
    if not label:
        raise DataFormatError("name the label column (--label)")
    if not categorical:
        raise DataFormatError("name at least one --categorical column (a DLRM needs a table)")
    stray = [c for c in multi_hot if c not in categorical]
    if stray:
        raise DataFormatError(f"--multi-hot column {stray} must also be --categorical")
    if delimiter is None:
        plain = path.name.removesuffix(".gz")
        delimiter = "\t" if plain.endswith((".tsv", ".tab")) else ","
    return SourceFormat(
        kind="csv", label=label, dense=tuple(dense), categorical=tuple(categorical),
        multi_hot=multi_hot, delimiter=delimiter, header=not columns,
        columns=tuple(columns or ()), dense_transform=dense_transform,
    )  # fmt: skip
