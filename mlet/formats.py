"""Raw rows as the Transform reads them: a declared source format and its columnar reader.

A `SourceFormat` names the columns of a raw file and what each one is; `read_batches`
streams any of the supported files as pyarrow record batches through pyarrow's columnar
CSV and Parquet readers (plain or .gz), so no Python runs per value. Bad input raises
`DataFormatError` naming the file, line (or row group) and column.
The formats themselves (Criteo, Avazu, any CSV) are declared by the data stage
(data/formats.py); `mlet predict` and export read them back from `transform.json`.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

AVAZU_HOUR = "hour"
AVAZU_DERIVED = ("hour_of_day", "day_of_week")
READ_BLOCK_BYTES = 1 << 20  # parsed in 1 MiB blocks: faster than 4 MiB here (cache)


class DataFormatError(ValueError):
    """Input that does not match its declared format; the message says where."""


@dataclass(frozen=True)
class SourceFormat:
    """How to read one kind of raw file and what each column is.

    `keys` is "hex" when categorical values are hexadecimal hashes (Criteo: the key of a
    value is int(value, 16)), else "string" (the key is FNV-1a 64 of the value's bytes).
    `hour` names a YYMMDDHH column split into the hour_of_day and day_of_week tables.
    """

    kind: str
    label: str | None
    dense: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    multi_hot: dict[str, str] = field(default_factory=dict)
    delimiter: str = ","
    header: bool = True
    columns: tuple[str, ...] = ()
    keys: str = "string"
    hour: str | None = None
    dense_transform: str = "log1p"

    @property
    def table_names(self) -> tuple[str, ...]:
        return self.categorical + (AVAZU_DERIVED if self.hour else ())

    @property
    def needed_columns(self) -> tuple[str, ...]:
        label = (self.label,) if self.label else ()
        return label + self.dense + self.categorical + ((self.hour,) if self.hour else ())

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "label": self.label, "dense": list(self.dense),
            "categorical": list(self.categorical), "multi_hot": dict(self.multi_hot),
            "delimiter": self.delimiter, "header": self.header, "columns": list(self.columns),
            "keys": self.keys, "hour": self.hour, "dense_transform": self.dense_transform,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> SourceFormat:
        data = dict(data)
        for key in ("dense", "categorical", "columns"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    def without_label(self) -> SourceFormat:
        """The same format for files that may lack the label (prediction inputs)."""
        columns = tuple(c for c in self.columns if c != self.label)
        return replace(self, label=None, columns=columns)


def is_parquet(path: Path) -> bool:
    return path.suffix == ".parquet"


def is_gzip(path: Path) -> bool:
    return path.suffix == ".gz"


def file_columns(path: Path, fmt: SourceFormat) -> list[str]:
    """Column names of a file: its header, Parquet schema, or the declared names."""
    if is_parquet(path):
        return list(pq.ParquetFile(path).schema_arrow.names)
    if not fmt.header:
        return list(fmt.columns)
    try:
        line = first_line(path)
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}:1: undecodable bytes in the header (not UTF-8)") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot read the header: {e}") from e
    return [c.strip().strip('"') for c in line.split(fmt.delimiter)]


def first_line(path: Path) -> str:
    """The first line, decoded alone (a bad byte further on must not fail it)."""
    with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as f:
        return f.readline().decode("utf-8").rstrip("\r\n")


def check_columns(path: Path, fmt: SourceFormat, available: list[str]) -> None:
    unknown = [c for c in fmt.needed_columns if c not in available]
    if unknown:
        raise DataFormatError(
            f"{path}: unknown column {', '.join(map(repr, unknown))}; the file has {available}"
        )


def column_types(fmt: SourceFormat, whole_dense: bool = False) -> dict[str, pa.DataType]:
    """The type each needed column is parsed as; `whole_dense` reads dense values as int64
    (Criteo's are counts: integers parse in less time than floats, into the same float32)."""
    types = {c: pa.int64() if whole_dense else pa.float64() for c in fmt.dense}
    types |= {c: pa.binary() for c in fmt.categorical}
    if fmt.hour:
        types[fmt.hour] = pa.int64()
    if fmt.label:
        types[fmt.label] = pa.int64()
    return types


def csv_reader(
    source,
    fmt: SourceFormat,
    column_names: list[str] | None,
    use_threads: bool,
    whole_dense: bool = False,
):
    """pyarrow's streaming CSV reader of `source` (a path, stream or buffer reader);
    `column_names` None reads them from the first line."""
    read = pacsv.ReadOptions(
        column_names=column_names, use_threads=use_threads, block_size=READ_BLOCK_BYTES
    )
    quote = False if fmt.kind == "criteo" else '"'
    parse = pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char=quote, ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(
        column_types=column_types(fmt, whole_dense),
        include_columns=list(fmt.needed_columns),
        strings_can_be_null=False,
    )
    return pacsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert)


def read_batches(path: Path, fmt: SourceFormat) -> Iterator[pa.RecordBatch]:
    """Record batches of the needed columns; errors name the file and, where known, the line."""
    if is_parquet(path):
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            yield from parquet_group(file, group, path, fmt)
        return
    # A path lets pyarrow read ahead in parallel; a gzip stream must be decompressed in order.
    source = pa.input_stream(str(path), compression="gzip") if is_gzip(path) else str(path)
    names = None if fmt.header else list(fmt.columns)
    yield from located(lambda: csv_reader(source, fmt, names, use_threads=True), path, fmt, 0)


def located(
    open_reader: Callable[[], Iterable[pa.RecordBatch]],
    path: Path,
    fmt: SourceFormat,
    rows_before: int,
) -> Iterator[pa.RecordBatch]:
    """The batches of a reader of the file's rows from `rows_before` on (it parses its
    first block when opened); a parse error names its line."""
    rows = rows_before
    try:
        for batch in open_reader():
            rows += batch.num_rows
            yield batch
    except (pa.ArrowInvalid, OSError, zlib.error, EOFError) as e:
        raise locate_error(path, fmt, rows, e) from e


def parquet_group(
    file: pq.ParquetFile, group: int, path: Path, fmt: SourceFormat
) -> Iterator[pa.RecordBatch]:
    """One row group's needed columns, cast to the types the transform reads."""
    table = file.read_row_group(group, columns=list(fmt.needed_columns))
    for name, dtype in column_types(fmt).items():
        column = table.column(name)
        if column.type == dtype:
            continue
        try:
            column = column.cast(pa.string() if dtype == pa.binary() else dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataFormatError(
                f"{path}: row group {group}, column {name!r}: cannot read "
                f"{column.type} as {dtype}: {e}"
            ) from e
        table = table.set_column(table.schema.get_field_index(name), name, column)
    yield from table.combine_chunks().to_batches()


def locate_error(path: Path, fmt: SourceFormat, rows_done: int, error: Exception) -> Exception:
    """Find the first bad line after `rows_done` good rows and say what is wrong with it.

    Only runs once reading has failed: it re-reads the rest of the file line by line in
    Python, which the fast path never does.
    """
    text = str(error)
    if is_gzip(path) and ("Truncated" in text or "truncated" in text):
        return DataFormatError(f"{path}: truncated gzip file (it ends after {rows_done:,} rows)")
    if is_gzip(path) and ("header" in text or "zlib" in text):
        return DataFormatError(f"{path}: not a gzip file ({text})")
    start = 1 + (1 if fmt.header else 0) + rows_done
    names = list(fmt.columns)
    try:
        with open(path, "rb") if not is_gzip(path) else gzip.open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and fmt.header:
                    names = file_columns(path, fmt)
                elif number >= start and (problem := line_problem(raw, fmt, names)):
                    return DataFormatError(f"{path}:{number}: {problem}")
    except (OSError, EOFError, zlib.error) as e:
        return DataFormatError(f"{path}: unreadable after {rows_done:,} rows: {e}")
    return DataFormatError(f"{path}: after {rows_done:,} rows: {text}")


def line_problem(raw: bytes, fmt: SourceFormat, names: list[str]) -> str | None:
    """What is wrong with one raw line, or None (the slow path of `locate_error`)."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return f"undecodable bytes at byte {e.start} (not UTF-8)"
    fields = line.split(fmt.delimiter)
    expected = len(names)
    if len(fields) != expected:
        hint = ""
        if fmt.delimiter == "\t" and len(fields) == 1 and "," in line:
            hint = " (this looks like a comma-separated file: use `mlet data csv` or `avazu`)"
        kind = describe(fmt.delimiter)
        return f"expected {expected} {kind}-separated fields, got {len(fields)}{hint}"
    values = dict(zip(names, fields, strict=True))
    if fmt.label and values.get(fmt.label, "").strip() not in ("0", "1"):
        return f"column {fmt.label!r}: label must be 0 or 1, got {values.get(fmt.label)!r}"
    for name in fmt.dense:
        if values[name] and not is_number(values[name]):
            return f"column {name!r}: not a number: {values[name]!r}"
    return None


def describe(delimiter: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}.get(
        delimiter, repr(delimiter)
    )


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
