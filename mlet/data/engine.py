"""The conversion engine: raw files in any supported format -> a dataset folder.

One streaming pass reads the files in order through pyarrow in chunks, checks every value
vectorised, writes labels and dense values straight to their .npy files (positioned
writes, never a growing in-memory array or a mapping of the output, so memory is bounded
by the chunk size whatever the file length) and counts the categorical keys of the
training rows. Rows are counted first (cheap: newlines, or Parquet metadata), so the split
is known before reading and the vocabularies see the training rows only: validation and
test rows (the last rows, as `split_rows` cuts them) never enter a vocabulary. Each
training chunk's distinct keys wait in a temporary file (its rows' positions among them
in sparse.npy) until the vocabularies are complete; later rows are encoded as read.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import queue
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mlet.data.dataset import DataSchema, split_rows
from mlet.data.encoding import MISSING_ID, KeyCounter, TableEncoder, distinct_keys
from mlet.data.formats import (
    DataFormatError,
    SourceFormat,
    check_columns,
    file_columns,
    is_gzip,
    is_parquet,
    read_batches,
)
from mlet.data.summary import Summary
from mlet.data.transform import Transform
from mlet.files import staged_directory, write_json

PENDING_KEYS = ".train-keys.tmp"


@dataclass(frozen=True)
class ConvertConfig:
    """How tables are encoded and how much is read.

    encoding "vocab": ids from the training rows' values seen at least `min_count` times;
    "hash": `hash_size` rows per table (or `hash_sizes`, one per table) plus a missing row.
    """

    encoding: str = "vocab"
    min_count: int = 1
    hash_size: int = 100_000
    hash_sizes: tuple[int, ...] = ()
    hotness: int = 1
    max_rows: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    chunk_rows: int = 32_768
    progress: bool = True

    def __post_init__(self) -> None:
        if self.encoding not in ("vocab", "hash"):
            raise ValueError(f"encoding must be vocab or hash, got {self.encoding!r}")
        if self.min_count < 1 or self.hotness < 1 or self.chunk_rows < 1:
            raise ValueError("min_count, hotness and chunk_rows must be positive")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {self.max_rows}")


def new_transform(fmt: SourceFormat, config: ConvertConfig) -> Transform:
    if fmt.multi_hot and config.hotness < 2:
        raise ValueError("multi-hot columns need --hotness H (values kept per row), H >= 2")
    names = fmt.table_names
    sizes = config.hash_sizes or (config.hash_size,) * len(names)
    if len(sizes) != len(names):
        raise ValueError(f"{len(names)} tables need {len(names)} hash sizes, got {len(sizes)}")
    empty = np.zeros(0, np.uint64)
    tables = [
        TableEncoder(name, config.encoding, size if config.encoding == "hash" else 0, empty)
        for name, size in zip(names, sizes, strict=True)
    ]
    return Transform(fmt, tables, config.hotness)


def count_rows(path: Path, fmt: SourceFormat) -> int:
    """Data rows of a file: lines (less the header), or the Parquet row count."""
    if is_parquet(path):
        return pq.ParquetFile(path).metadata.num_rows
    lines, last = 0, b"\n"
    try:
        with gzip.open(path, "rb") if is_gzip(path) else open(path, "rb") as f:
            while block := f.read(16 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
    except gzip.BadGzipFile as e:
        raise DataFormatError(f"{path}: not a gzip file ({e})") from e
    except (EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: truncated or corrupt gzip file ({e})") from e
    lines += last != b"\n"
    return max(lines - (1 if fmt.header else 0), 0)


class NpyFile:
    """A .npy file of known shape written by row ranges at their offsets (os.pwrite)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = np.dtype(dtype), shape
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(os.dup(self.fd), "wb") as f:
            np.lib.format.write_array_header_1_0(f, header | {"shape": shape})
            self.data_start = f.tell()
        os.ftruncate(self.fd, self.data_start + self.row_bytes * shape[0])

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        offset = self.data_start + start * self.row_bytes
        while data:
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written

    def read(self, start: int, count: int) -> np.ndarray:
        raw = os.pread(self.fd, count * self.row_bytes, self.data_start + start * self.row_bytes)
        return np.frombuffer(raw, self.dtype).reshape((count, *self.shape[1:]))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Chunk:
    """Rows [start, start + len) of the dataset, read from `path` from `first_line` on."""

    start: int
    batch: pa.RecordBatch
    path: Path
    first_line: int


def chunks(sources: list[Path], fmt: SourceFormat, rows: int, chunk_rows: int) -> Iterator[Chunk]:
    """The first `rows` rows of the files in order, in chunks of about `chunk_rows`."""
    start = 0
    for path in sources:
        first_line = 1 + (1 if fmt.header else 0)
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in read_batches(path, fmt):
            batch = batch.slice(0, rows - start - pending_rows)
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= chunk_rows or start + pending_rows >= rows:
                yield Chunk(start, combine(pending), path, first_line)
                start, first_line = start + pending_rows, first_line + pending_rows
                pending, pending_rows = [], 0
            if start >= rows:
                return
        if pending_rows:
            yield Chunk(start, combine(pending), path, first_line)
            start += pending_rows


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a thread `depth` items ahead: parsing (pyarrow) overlaps encoding
    (numpy); both release the GIL. Errors reach the consumer in order."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
        except BaseException as e:  # handed to the consumer, which raises it
            slots.put((None, e))
            return
        slots.put((None, StopIteration()))

    worker = threading.Thread(target=produce, name="mlet-data-reader", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if isinstance(error, StopIteration):
                return
            if error is not None:
                raise error
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.05)


def combine(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


class Conversion:
    """State of one conversion: output files, the transform being learned, the summary.

    Training rows are hashed once: each chunk's distinct keys per table are counted and
    spilled to a temporary file, and the rows' positions among them (local ids) wait in
    sparse.npy; once the vocabularies are complete, `finish` maps every chunk's distinct
    keys to ids and rewrites its rows through that small table.
    """

    def __init__(self, folder: Path, transform: Transform, rows: int, config: ConvertConfig):
        fmt = transform.fmt
        self.transform, self.rows, self.config = transform, rows, config
        split = split_rows(rows, config.val_fraction, config.test_fraction)
        self.train_end = split.val.start if config.encoding == "vocab" else 0
        tables, hotness = len(transform.tables), transform.hotness
        sparse_shape = (rows, tables) + ((hotness,) if hotness > 1 else ())
        self.labels = NpyFile(folder / "labels.npy", np.uint8, (rows,))
        self.dense = NpyFile(folder / "dense.npy", np.float32, (rows, len(fmt.dense)))
        self.sparse = NpyFile(folder / "sparse.npy", np.int32, sparse_shape)
        spill = folder / PENDING_KEYS
        self.spill = open(spill, "w+b") if self.train_end else None  # noqa: SIM115 (close())
        self.pending: list[tuple[int, int, list[tuple[int, int]]]] = []  # start, rows, spans
        self.counters = [KeyCounter() for _ in transform.tables]
        self.summary = Summary.start(fmt, transform)

    def add(self, chunk: Chunk) -> None:
        features = self.transform.features(chunk.batch, str(chunk.path), chunk.first_line)
        start, count = chunk.start, chunk.batch.num_rows
        self.labels.write(start, features.labels)
        self.dense.write(start, features.dense)
        self.summary.add(features)
        cut = min(max(self.train_end - start, 0), count)
        if cut:
            self.hold_training_rows(start, features.keys[:, :cut], features.missing[:, :cut])
        if cut == count:
            return
        if start + cut == self.train_end:
            self.build_vocabularies()
        keys, missing = features.keys[:, cut:], features.missing[:, cut:]
        self.write_ids(start + cut, keys, missing, held_out=self.train_end > 0)  # OOV: vocab only

    def hold_training_rows(self, start: int, keys: np.ndarray, missing: np.ndarray) -> None:
        """Count the distinct keys [T, B, H] per table; park local ids in sparse.npy."""
        local = np.empty(keys.shape, np.int32)
        spans = []
        for t, counter in enumerate(self.counters):
            distinct, positions = distinct_keys(keys[t].ravel())
            positions = positions.reshape(keys[t].shape)
            present = ~missing[t]
            counter.add_counts(distinct, np.bincount(positions[present], minlength=len(distinct)))
            local[t] = np.where(present, positions, -1)
            spans.append((self.spill.tell(), len(distinct)))
            self.spill.write(distinct.tobytes())
        self.sparse.write(start, squeeze(local.transpose(1, 0, 2)))
        self.pending.append((start, keys.shape[1], spans))

    def build_vocabularies(self) -> None:
        for table, counter in zip(self.transform.tables, self.counters, strict=True):
            if table.encoding == "vocab" and table.vocabulary.size == 0:
                table.vocabulary = counter.vocabulary(self.config.min_count)
        self.counters = []

    def write_ids(self, start: int, keys, missing, held_out: bool) -> None:
        ids = self.transform.encode(keys, missing)
        self.sparse.write(start, ids)
        if held_out:
            self.summary.add_held_out(ids, missing)

    def finish(self) -> None:
        """Encode the training rows now that the vocabularies are complete."""
        if self.counters:
            self.build_vocabularies()
        if self.spill is not None:
            self.spill.flush()
        for start, count, spans in self.pending:
            local = self.sparse.read(start, count).reshape(count, len(spans), -1).copy()
            for t, (offset, length) in enumerate(spans):
                distinct = np.frombuffer(os.pread(self.spill.fileno(), 8 * length, offset), "<u8")
                lookup = np.append(self.transform.tables[t].lookup(distinct), MISSING_ID)
                local[:, t] = lookup[local[:, t]]  # -1 (missing) picks the appended 0
            self.sparse.write(start, squeeze(local))
        self.close()

    def close(self) -> None:
        for f in (self.labels, self.dense, self.sparse, self.spill):
            if f is not None:
                f.close()


def squeeze(ids: np.ndarray) -> np.ndarray:
    """[B, T, 1] -> [B, T]; multi-hot ids keep their hotness axis."""
    return ids[:, :, 0] if ids.shape[2] == 1 else ids


def convert(
    sources: list[str | Path] | str | Path,
    fmt: SourceFormat,
    out: str | Path,
    config: ConvertConfig = ConvertConfig(),
    overwrite: bool = False,
) -> DataSchema:
    """Convert raw files (read in order, as one stream of rows) into a dataset folder."""
    paths = [Path(p) for p in ([sources] if isinstance(sources, str | Path) else sources)]
    if not paths:
        raise ValueError("give at least one input file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        check_columns(path, fmt, file_columns(path, fmt))
    started = time.perf_counter()
    counts = [count_rows(p, fmt) for p in paths]
    rows = min(sum(counts), config.max_rows or sum(counts))
    if rows == 0:
        raise DataFormatError(f"{', '.join(map(str, paths))}: no rows")
    transform = new_transform(fmt, config)
    with staged_directory(out, replace=overwrite) as staging:
        conversion = Conversion(staging, transform, rows, config)
        total_bytes = sum(p.stat().st_size for p in paths)
        bar = tqdm(total=rows, unit="row", unit_scale=True, disable=not config.progress)
        try:
            for chunk in prefetched(chunks(paths, fmt, rows, config.chunk_rows)):
                conversion.add(chunk)
                bar.update(chunk.batch.num_rows)
                bar.set_postfix_str(f"{total_bytes * bar.n / rows / 1e6:,.0f} MB")
            conversion.finish()
        finally:
            bar.close()
            conversion.close()
        (staging / PENDING_KEYS).unlink(missing_ok=True)
        transform.save(staging)
        summary = conversion.summary.to_dict(transform, rows, time.perf_counter() - started)
        schema = DataSchema(
            num_dense=len(fmt.dense),
            table_sizes=transform.table_sizes,
            hotness=transform.hotness,
            dense_transform=fmt.dense_transform,
            dense_names=fmt.dense,
            table_names=fmt.table_names,
            rows=rows,
            source={
                "kind": fmt.kind,
                "paths": [str(p.resolve()) for p in paths],
                "encoding": config.encoding,
                "min_count": config.min_count,
                "vocabulary_rows": conversion.train_end,
                "split": {"val": config.val_fraction, "test": config.test_fraction},
                "summary": summary,
            },
        )
        write_json(staging / "schema.json", schema.to_dict())
    return schema
