"""A request of logged columns -> the model's inputs, by the model's own `Transform`.

The raw-row model that export writes beside every model takes one input per logged
column: categorical columns (and Avazu's YYMMDDHH hour) as BYTES [batch, 1], numeric ones
as FP32 [batch, 1] with NaN where the log has no value. Its transform step turns them into
`dense` and `sparse` by building the record batch that the file readers of `mlet data` and
`mlet predict` build from a line, and running the same `Transform.features` and
`Transform.encode` on it, so that a served raw row scores what `mlet predict` scores.

This module imports neither torch nor the server: Triton's Python backend runs it too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlet.formats import DataFormatError, SourceFormat
from mlet.transform import Transform

RAW_SUFFIX = "-raw"  # the ensemble a client calls with logged columns
TRANSFORM_SUFFIX = "-transform"  # its first step


@dataclass(frozen=True)
class RawColumn:
    name: str
    datatype: str  # KServe v2: BYTES or FP32


def raw_columns(fmt: SourceFormat) -> list[RawColumn]:
    """The inputs of a raw-row model, in the order of the source's columns."""
    columns = [RawColumn(name, "FP32") for name in fmt.dense]
    columns += [RawColumn(name, "BYTES") for name in fmt.categorical]
    if fmt.hour:
        columns.append(RawColumn(fmt.hour, "BYTES"))
    return columns


def as_bytes(values: np.ndarray) -> list[bytes]:
    """A BYTES tensor's elements (bytes, or str from a JSON client) as bytes."""
    return [raw_value(v) for v in values.reshape(-1)]


def raw_batch(fmt: SourceFormat, columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    """The record batch a file reader gives for these rows: numbers as float64 with null
    where missing (NaN), categorical values as binary, the hour as int64."""
    names = [c.name for c in raw_columns(fmt)]
    missing = [name for name in names if name not in columns]
    if missing:
        raise DataFormatError(f"missing input column(s) {missing}")
    lengths = {np.size(columns[name]) for name in names}
    if len(lengths) > 1:
        raise DataFormatError(f"input columns differ in rows: {sorted(lengths)}")
    arrays = {}
    # one Arrow array for all numeric and one for all categorical columns, each column a
    # slice of it: two conversions a request instead of one a column
    if fmt.dense:
        values = np.concatenate([np.asarray(columns[n], np.float64).reshape(-1)
                                 for n in fmt.dense])  # fmt: skip
        arrays.update(column_slices(fmt.dense, pa.array(values, mask=np.isnan(values))))
    if fmt.categorical:
        values = [v for name in fmt.categorical for v in as_bytes(columns[name])]
        arrays.update(column_slices(fmt.categorical, pa.array(values, pa.binary())))
    if fmt.hour:
        arrays[fmt.hour] = hour_column(fmt.hour, as_bytes(columns[fmt.hour]))
    return pa.RecordBatch.from_pydict(arrays)


def column_slices(names: list[str], combined: pa.Array) -> dict[str, pa.Array]:
    """Equal, consecutive slices of `combined`, one per column name, in order."""
    rows = len(combined) // len(names)
    return {name: combined.slice(i * rows, rows) for i, name in enumerate(names)}


def hour_column(name: str, values: list[bytes]) -> pa.Array:
    try:
        return pc.cast(pa.array(values, pa.binary()).cast(pa.string()), pa.int64())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataFormatError(f"column {name!r}: not a YYMMDDHH hour ({e})") from e


def raw_to_inputs(
    transform: Transform, columns: dict[str, np.ndarray], sparse_dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """(dense float32 [B, F], sparse ids [B, T] or [B, T, H]) for the model's inputs."""
    served = replace(transform, fmt=transform.fmt.without_label())
    features = served.features(raw_batch(served.fmt, columns), "request row", 0)
    ids = served.encode(features.keys)
    return features.dense, ids.astype(sparse_dtype)


def batch_columns(fmt: SourceFormat, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """A file reader's batch as a raw-row request's inputs [B, 1]: what a client sends
    for the rows it logged (numbers float32 with NaN where empty, the rest bytes)."""
    columns = {}
    for column in raw_columns(fmt):
        values = batch.column(column.name)
        if column.datatype == "FP32":
            array = pc.fill_null(values.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            columns[column.name] = array.astype(np.float32).reshape(-1, 1)
        else:
            items = values.cast(pa.binary()) if values.type != pa.int64() else values
            array = np.array([raw_value(v) for v in items.to_pylist()], dtype=object)
            columns[column.name] = array.reshape(-1, 1)
    return columns


def raw_value(value) -> bytes:
    """A logged value as sent: a missing one (null in Parquet) is empty, as in a CSV."""
    if value is None:
        return b""
    return value if isinstance(value, bytes) else str(value).encode()
