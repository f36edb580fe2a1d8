"""The transform from raw rows to model inputs, shared by `mlet data` and `mlet predict`.

A dataset folder stores it as `transform.json` (the source format, each table's encoding)
beside its vocabularies (`vocab.<table>.npy`); training copies these files into the run
folder and export into the model folder, so a model carries everything needed to score
raw rows: the same `Transform.features` and `Transform.encode` run in both places.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlet.encoding import (
    BadValue,
    ColumnKeys,
    TableEncoder,
    dictionary_keys,
    gathered_ids,
    hex_column_keys,
    hour_keys,
    load_vocabulary,
    split_multi_hot,
    stacked_positions,
    string_keys,
    vocabulary_file,
)
from mlet.files import read_json, write_json
from mlet.formats import DataFormatError, SourceFormat
from mlet.repository import TRANSFORM_FILE

FLOAT32_MAX = float(np.finfo(np.float32).max)
SMALL = 4096  # values of all tables together, below which they are decoded in one call


@dataclass
class Features:
    """One batch of raw rows, checked: B rows, F dense, T tables, H hotness."""

    labels: np.ndarray | None  # uint8 [B]
    dense: np.ndarray  # float32 [B, F], empty values 0
    keys: list[ColumnKeys]  # one per table
    empty_dense: np.ndarray  # int64 [F] empty values per dense column

    @functools.cached_property
    def empty_tables(self) -> np.ndarray:
        """int64 [T] rows without a value per table: counted when asked, as conversion's
        summary does and a served request never does."""
        return np.array([k.empty_rows() for k in self.keys], np.int64)


@dataclass
class Transform:
    fmt: SourceFormat
    tables: list[TableEncoder]
    hotness: int = 1

    @property
    def hashed(self) -> bool:
        """Every table hashed: ids need no vocabulary, so any thread may encode them."""
        return all(table.encoding == "hash" for table in self.tables)

    @property
    def table_sizes(self) -> tuple[int, ...]:
        return tuple(t.rows for t in self.tables)

    def features(self, batch: pa.RecordBatch, where: str, first_line: int) -> Features:
        """Check and read one batch; `first_line` is the file line of its first row."""
        try:
            return self._features(batch)
        except BadValue as e:
            column = getattr(e, "column", "?")
            raise DataFormatError(f"{where}:{first_line + e.row}: column {column!r}: {e}") from e

    def _features(self, batch: pa.RecordBatch) -> Features:
        fmt, rows = self.fmt, batch.num_rows
        labels = read_labels(batch, fmt.label) if fmt.label else None
        dense = np.zeros((rows, len(fmt.dense)), np.float32)
        empty_dense = np.zeros(len(fmt.dense), np.int64)
        for i, name in enumerate(fmt.dense):
            dense[:, i], empty_dense[i] = with_column(name, read_dense, batch.column(name))
        keys = self.categorical_keys(batch)
        if fmt.hour:
            hours = batch.column(fmt.hour).to_numpy(zero_copy_only=False)
            hour, weekday = with_column(fmt.hour, hour_keys, hours)
            keys += [small_keys(hour, 24, self.hotness), small_keys(weekday, 7, self.hotness)]
        return Features(labels, dense, keys, empty_dense)

    def categorical_keys(self, batch: pa.RecordBatch) -> list[ColumnKeys]:
        """The keys of every categorical column, one ColumnKeys per table."""
        names, rows = self.fmt.categorical, batch.num_rows
        if self.fmt.keys == "hex" and not self.fmt.multi_hot and rows * len(names) <= SMALL:
            return self.small_hex_keys(batch)
        return [with_column(name, self.column_keys, name, batch.column(name)) for name in names]

    def small_hex_keys(self, batch: pa.RecordBatch) -> list[ColumnKeys]:
        """A few rows (a served request, say): every table's values decoded in one call.

        At a few values a column, each call's fixed cost is most of the work (26 calls of
        about 70 us against one for a Criteo row). The tables share the distinct keys;
        each keeps its own positions, so every id comes out as the per-column path gives.
        """
        names, rows = self.fmt.categorical, batch.num_rows
        columns = [batch.column(n) for n in names]
        combined = pa.concat_arrays([c if c.type == pa.binary() else c.cast(pa.binary())
                                     for c in columns])  # fmt: skip
        try:
            keys = hex_column_keys(combined)
        except BadValue as e:  # its row counts every table's rows: table-major
            raise with_name(BadValue(e.row % rows, str(e)), names[e.row // rows]) from e
        return [keys.rows(t * rows, (t + 1) * rows) for t in range(len(names))]

    def column_keys(self, name: str, column: pa.Array) -> ColumnKeys:
        """The keys of one categorical column, H slots per row."""
        separator = self.fmt.multi_hot.get(name)
        if separator is None:
            return self.value_keys(column).widened(self.hotness)
        values, present = split_multi_hot(column, separator, self.hotness)
        try:
            keys = self.value_keys(values)
        except BadValue as e:  # its row counts flattened values: H per row
            raise BadValue(e.row // self.hotness, str(e)) from e
        slots = ColumnKeys(keys.distinct, keys.missing, keys.positions.reshape(present.shape))
        return slots.with_empty_slots(~present)

    def value_keys(self, values: pa.Array) -> ColumnKeys:
        """The keys of a column's values, one slot per value."""
        if self.fmt.keys == "hex":
            return hex_column_keys(values)
        return dictionary_keys(values, string_keys)

    def encode(self, keys: list[ColumnKeys]) -> np.ndarray:
        """Keys of T tables -> int32 ids [B, T] (hotness 1) or [B, T, H]."""
        lookups = [
            table.distinct_ids(k.distinct, k.missing)
            for table, k in zip(self.tables, keys, strict=True)
        ]
        return squeeze(gathered_ids(lookups, stacked_positions(keys)))

    def to_dict(self) -> dict:
        return {
            "format": self.fmt.to_dict(),
            "hotness": self.hotness,
            "tables": [
                {"name": t.name, "encoding": t.encoding, "hash_size": t.hash_size, "rows": t.rows}
                for t in self.tables
            ],
        }

    def save(self, folder: Path) -> None:
        """transform.json and one vocabulary file per vocab-encoded table."""
        for table in self.tables:
            if table.encoding == "vocab":
                np.save(vocabulary_file(folder, table.name), table.vocabulary)
        write_json(Path(folder) / TRANSFORM_FILE, self.to_dict())


def small_keys(values: np.ndarray, size: int, hotness: int) -> ColumnKeys:
    """Keys 0..size-1 that are their own positions (the derived hour tables)."""
    positions = values.astype(np.int32)[:, None]
    keys = ColumnKeys(np.arange(size, dtype=np.uint64), np.zeros(size, bool), positions)
    return keys.widened(hotness)


def squeeze(ids: np.ndarray) -> np.ndarray:
    """[B, T, 1] -> [B, T]; multi-hot ids keep their hotness axis."""
    return ids[:, :, 0] if ids.shape[2] == 1 else ids


def with_column(name: str, function, *args):
    """Call `function`, naming `name` in the BadValue it raises."""
    try:
        return function(*args)
    except BadValue as e:
        e.column = name
        raise


def read_labels(batch: pa.RecordBatch, name: str) -> np.ndarray:
    column = batch.column(name)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise with_name(BadValue(row, "the label is empty"), name)
    values = column.to_numpy()
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise with_name(BadValue(row, f"label must be 0 or 1, got {values[row]}"), name)
    return values.astype(np.uint8)


def with_name(error: BadValue, name: str) -> BadValue:
    error.column = name
    return error


def read_dense(column: pa.Array) -> tuple[np.ndarray, int]:
    """float32 values (empty: 0) and the number of empty values; refuses what float32
    cannot hold rather than storing inf."""
    empty = int(column.null_count)
    if empty:
        column = pc.fill_null(column, 0.0)
    values = column.to_numpy(zero_copy_only=False)
    if values.size and not (values.max() <= FLOAT32_MAX and values.min() >= -FLOAT32_MAX):
        row = int(np.argmax(~(np.abs(values) <= FLOAT32_MAX)))
        raise BadValue(row, f"{values[row]!r} is not a finite number that fits in float32")
    return values.astype(np.float32), empty


def load_transform(folder: str | Path) -> Transform:
    """The transform stored in a dataset, run or model folder, vocabularies memory-mapped."""
    folder = Path(folder)
    data = read_json(folder / TRANSFORM_FILE)
    tables = []
    for spec in data["tables"]:
        vocabulary = load_vocabulary(folder, spec["name"]) if spec["encoding"] == "vocab" else None
        tables.append(TableEncoder(spec["name"], spec["encoding"], spec["hash_size"], vocabulary))
    return Transform(SourceFormat.from_dict(data["format"]), tables, data.get("hotness", 1))


def transform_files(folder: str | Path) -> list[Path]:
    """transform.json and the vocabularies of a folder (none when it has no transform)."""
    folder = Path(folder)
    if not (folder / TRANSFORM_FILE).is_file():
        return []
    return [folder / TRANSFORM_FILE, *sorted(folder.glob("vocab.*.npy"))]


def copy_vocabularies(src_folder: str | Path, dst_folder: str | Path) -> list[Path]:
    """Copy the transform and vocabularies of `src_folder` (if any) into `dst_folder`."""
    copied = []
    for path in transform_files(src_folder):
        shutil.copyfile(path, Path(dst_folder) / path.name)
        copied.append(Path(dst_folder) / path.name)
    return copied
