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

import re
from bisect import bisect_left
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlet.encoding import (
    FIRST_VOCAB_ID,
    FNV_OFFSET,
    FNV_PRIME,
    MISSING_ID,
    OOV_ID,
    BadValue,
    TableEncoder,
    hour_keys,
    not_utf8,
)
from mlet.formats import DataFormatError, SourceFormat
from mlet.transform import FLOAT32_MAX, Transform

RAW_SUFFIX = "-raw"  # the ensemble a client calls with logged columns
TRANSFORM_SUFFIX = "-transform"  # its first step
# Up to this many rows a request is transformed value by value (few_rows_to_inputs): the
# batch path's fixed cost per column is most of its work below a hundred rows or so
# (Criteo, one row: 0.06-0.1 ms value by value, 0.43 ms by record batch; 16 rows 0.3 ms
# against 0.85; 64 rows 1.0 ms against 1.8). The server's batcher merges 1-row requests
# into batches of tens of rows, which this keeps on the cheaper path.
FEW_ROWS = 64
# Values that every path reads alike: plain hex digits (int(value, 16) below 2**64) and
# plain decimal hours. Anything else takes the batch path, which reads or refuses it.
PLAIN_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
PLAIN_HOUR = re.compile(rb"[0-9]{1,18}")


@dataclass(frozen=True)
class RawColumn:
    name: str
    datatype: str  # KServe v2: BYTES or FP32


def raw_column_names(fmt: SourceFormat) -> tuple[str, ...]:
    """The input names of a raw-row model, in order: numeric columns, then categorical
    ones, then the hour."""
    return fmt.dense + fmt.categorical + ((fmt.hour,) if fmt.hour else ())


def raw_columns(fmt: SourceFormat) -> list[RawColumn]:
    """The inputs of a raw-row model, in the order of the source's columns."""
    numeric = len(fmt.dense)
    return [
        RawColumn(name, "FP32" if i < numeric else "BYTES")
        for i, name in enumerate(raw_column_names(fmt))
    ]


def as_bytes(values: np.ndarray) -> list[bytes]:
    """A BYTES tensor's elements (bytes, or str from a JSON client) as bytes."""
    return [raw_value(v) for v in values.reshape(-1)]


def raw_batch(fmt: SourceFormat, columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    """The record batch a file reader gives for these rows: numbers as float64 with null
    where missing (NaN), categorical values as binary, the hour as int64."""
    names = raw_column_names(fmt)
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
    few = few_rows_to_inputs(transform, columns, sparse_dtype)
    return few if few is not None else batch_to_inputs(transform, columns, sparse_dtype)


def batch_to_inputs(
    transform: Transform, columns: dict[str, np.ndarray], sparse_dtype=np.int64
) -> tuple[np.ndarray, np.ndarray]:
    """raw_to_inputs through the record batch that the file readers build."""
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


def few_rows_to_inputs(
    transform: Transform, columns: dict[str, np.ndarray], sparse_dtype=np.int64
) -> tuple[np.ndarray, np.ndarray] | None:
    """raw_to_inputs of a request of at most FEW_ROWS rows, one value at a time; None
    when the request needs the batch path: more rows, multi-hot columns, or any value
    that is not plain (the batch path then reads it leniently or names what is wrong)."""
    fmt = transform.fmt
    if transform.hotness != 1 or fmt.multi_hot:
        return None
    try:
        arrays = [np.asarray(columns[n]).reshape(-1) for n in raw_column_names(fmt)]
    except KeyError:
        return None
    rows = len(arrays[0])
    if not 0 < rows <= FEW_ROWS or any(len(a) != rows for a in arrays):
        return None
    numeric = len(fmt.dense)
    dense = few_dense(arrays[:numeric], rows)
    hex_keys = fmt.keys == "hex"
    keys = [
        few_keys(hex_keys, values) for values in arrays[numeric : numeric + len(fmt.categorical)]
    ]
    if fmt.hour:
        keys += few_hour_keys(arrays[-1]) or [None]
    if dense is None or any(k is None for k in keys):
        return None
    ids = [few_ids(table, k) for table, k in zip(transform.tables, keys, strict=True)]
    return dense, np.array(ids, sparse_dtype).T.reshape(rows, len(ids))


def few_dense(arrays: list[np.ndarray], rows: int) -> np.ndarray | None:
    """float32 [B, F] of the numeric columns (flat), NaN (missing) as 0; None for what
    float32 cannot hold."""
    if not arrays:
        return np.zeros((rows, 0), np.float32)
    if all(a.dtype == np.float32 for a in arrays):  # as the server decodes FP32 inputs
        values = np.stack(arrays, 1)
    else:
        try:
            values = np.stack([a.astype(np.float64) for a in arrays], 1)
        except (TypeError, ValueError):
            return None
    values[np.isnan(values)] = 0.0
    if not (np.abs(values) <= FLOAT32_MAX).all():
        return None
    return values.astype(np.float32, copy=False)


def few_keys(hex_keys: bool, values: np.ndarray) -> list[int | None] | None:
    """Each value's key (None where empty), as mlet.encoding computes it; None when a
    value is not plain."""
    keys = []
    for value in values:
        raw = raw_value(value)
        if not raw:
            keys.append(None)
        elif hex_keys:
            if PLAIN_HEX.fullmatch(raw) is None:
                return None
            keys.append(int(raw, 16))
        elif raw.isascii() or not not_utf8(raw):
            keys.append(fnv1a64(raw))
        else:
            return None
    return keys


def few_hour_keys(values: np.ndarray) -> list[list[int]] | None:
    """[hour of day keys, day of week keys] of YYMMDDHH values; None unless all plain."""
    raws = [raw_value(v) for v in values]
    if any(PLAIN_HOUR.fullmatch(raw) is None for raw in raws):
        return None
    try:
        hour, weekday = hour_keys(np.array([int(raw) for raw in raws], np.int64))
    except BadValue:
        return None
    return [hour.tolist(), weekday.tolist()]


def few_ids(table: TableEncoder, keys: list[int | None]) -> list[int]:
    """Each key's id in its table, as TableEncoder.encode gives it."""
    if table.encoding == "hash":
        size = table.hash_size
        return [MISSING_ID if k is None else 1 + k % size for k in keys]
    # Searched as Python ints (a vocabulary is native uint64, load_vocabulary checks):
    # numpy's searchsorted and its scalars cost more per call than the search itself.
    vocabulary = memoryview(table.vocabulary)
    size = len(vocabulary)
    ids = []
    for key in keys:
        if key is None:
            ids.append(MISSING_ID)
            continue
        position = bisect_left(vocabulary, key)
        found = position < size and vocabulary[position] == key
        ids.append(position + FIRST_VOCAB_ID if found else OOV_ID)
    return ids


def fnv1a64(raw: bytes) -> int:
    """FNV-1a 64 of one value's bytes (mlet.encoding.fnv1a64 does a column at once)."""
    value, prime = int(FNV_OFFSET), int(FNV_PRIME)
    for byte in raw:
        value = ((value ^ byte) * prime) & 0xFFFFFFFFFFFFFFFF
    return value
