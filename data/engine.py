"""The conversion engine: raw files in any supported format -> a dataset folder.

The files are cut into parts (`data.parts`: newline-aligned byte ranges, Parquet row
groups, whole gzip files) whose rows are counted first, so the split is known before
reading and the vocabularies see the training rows only: validation and test rows (the
last rows, as `split_rows` cuts them) never enter a vocabulary. A pool of threads parses
parts and reads their features (pyarrow and numpy release the GIL), a few parts ahead;
this thread takes them in file order, writes labels and dense values straight to their
.npy files (positioned writes, never a growing in-memory array or a mapping of the
output, so memory is bounded by the parts in flight whatever the file length) and counts
the categorical keys of the training rows. Each training chunk's distinct keys wait in a
temporary file (its rows' positions among them in sparse.npy) until the vocabularies are
complete; later rows are encoded by tasks in the pool as they arrive. Hashed tables need
no vocabulary, so the threads that read such rows encode them too.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data.parts import Part, plan_parts, read_part, whole_dense_first
from data.summary import Summary
from data.vocabulary import KeyCounter
from mlet.dataset import DataSchema, split_rows
from mlet.encoding import (
    ColumnKeys,
    TableEncoder,
    gathered_ids,
    stacked_positions,
    value_counts,
)
from mlet.files import staged_directory, write_json
from mlet.formats import DataFormatError, SourceFormat, check_columns, file_columns
from mlet.transform import Features, Transform, squeeze

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
    part_bytes: int = 16 << 20  # a plain file is cut into parts of about this size
    workers: int = 0  # threads that parse parts; 0: one per core
    progress: bool = True

    def __post_init__(self) -> None:
        if self.encoding not in ("vocab", "hash"):
            raise ValueError(f"encoding must be vocab or hash, got {self.encoding!r}")
        if min(self.min_count, self.hotness, self.chunk_rows, self.part_bytes) < 1:
            raise ValueError("min_count, hotness, chunk_rows and part_bytes must be positive")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per core) or more, got {self.workers}")
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
        data = memoryview(np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1).view(np.uint8))
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
    """Rows [start, start + rows) of the dataset, read and checked; `ids` are encoded
    where reading them needs no vocabulary (every table hashed)."""

    start: int
    features: Features
    ids: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.features.dense)


def part_chunks(
    part: Part, fmt: SourceFormat, chunk_rows: int, whole_dense: bool = False
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row within the part, batch of about `chunk_rows` rows) of one part, in order."""
    pending: list[pa.RecordBatch] = []
    done = pending_rows = 0
    for batch in read_part(part, fmt, whole_dense):
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= chunk_rows:
            yield done, combine(pending)
            done, pending, pending_rows = done + pending_rows, [], 0
    if pending_rows:
        yield done, combine(pending)


def read_chunks(
    part: Part, transform: Transform, chunk_rows: int, batches: list | None = None
) -> list[Chunk]:
    """Parse (unless `batches` are given) and check one part's rows."""
    fmt = transform.fmt
    if batches is None and whole_dense_first(part, fmt):
        try:
            return checked_chunks(part, transform, part_chunks(part, fmt, chunk_rows, True))
        except pa.ArrowInvalid:  # a count that is no whole number, or bad input:
            pass  # the float pass below reads it, or says where the error is
    if batches is None:
        batches = part_chunks(part, fmt, chunk_rows)
    return checked_chunks(part, transform, batches)


def checked_chunks(
    part: Part, transform: Transform, batches: Iterable[tuple[int, pa.RecordBatch]]
) -> list[Chunk]:
    """The features (and hashed ids) of a part's batches, checked."""
    chunks = []
    first_line = 1 + (1 if transform.fmt.header else 0) + part.file_row
    for done, batch in batches:
        features = transform.features(batch, str(part.path), first_line + done)
        ids = transform.encode(features.keys) if transform.hashed else None
        chunks.append(Chunk(part.start + done, features, ids))
    return chunks


def work(
    parts: list[Part], transform: Transform, chunk_rows: int
) -> Iterator[Callable[[], list[Chunk]]]:
    """Tasks that each return chunks, in order: a whole part each where parts can be read
    anywhere; a gzip file is parsed here, in order, and only its checks run as tasks."""
    for part in parts:
        if not part.whole_file:
            yield partial(read_chunks, part, transform, chunk_rows)
            continue
        for item in part_chunks(part, transform.fmt, chunk_rows):
            yield partial(read_chunks, part, transform, chunk_rows, [item])


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a thread `depth` items ahead; the consumer gets them, and errors,
    in order. `convert` runs the generator that hands parts to the pool this way (it
    also parses gzip files), so the main thread only waits for finished parts."""
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
    sparse.npy; once the vocabularies are complete, tasks in `pool` map every chunk's
    distinct keys to ids and rewrite its rows through that small table, and encode the
    validation and test rows that this thread hands them.
    """

    def __init__(
        self,
        folder: Path,
        transform: Transform,
        rows: int,
        config: ConvertConfig,
        pool: Executor,
    ):
        fmt = transform.fmt
        self.transform, self.rows, self.config, self.pool = transform, rows, config, pool
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
        self.counters = [KeyCounter() for _ in transform.tables] if self.train_end else []
        self.rewrites: list[Future] = []
        self.held_out: list[Future] = []  # each gives (values, OOV values) per table
        self.summary = Summary.start(fmt, transform)

    def add(self, chunk: Chunk) -> None:
        features, start, count = chunk.features, chunk.start, chunk.rows
        self.labels.write(start, features.labels)
        self.dense.write(start, features.dense)
        self.summary.add(features)
        cut = min(max(self.train_end - start, 0), count)
        if cut:
            self.hold_training_rows(start, cut, [k.rows(0, cut) for k in features.keys])
        if cut == count:
            return
        if self.counters and start + cut == self.train_end:
            self.build_vocabularies()
        if chunk.ids is not None:
            self.sparse.write(start, chunk.ids)
            return
        keys = [k.rows(cut, count) for k in features.keys]
        self.held_out.append(self.pool.submit(self.write_held_out, start + cut, keys))

    def hold_training_rows(self, start: int, rows: int, keys: list[ColumnKeys]) -> None:
        """Count each table's distinct keys; park the rows' positions among them in sparse.npy
        and the distinct keys (with their missing flags) in the spill file."""
        spans = []
        for counter, table_keys in zip(self.counters, keys, strict=True):
            present = ~table_keys.missing
            counter.add_counts(table_keys.distinct[present], table_keys.counts()[present])
            spans.append((self.spill.tell(), len(table_keys.distinct)))
            self.spill.write(np.ascontiguousarray(table_keys.distinct, "<u8"))
            self.spill.write(np.ascontiguousarray(table_keys.missing))
        self.sparse.write(start, squeeze(stacked_positions(keys)))
        self.pending.append((start, rows, spans))

    def build_vocabularies(self) -> None:
        """Vocabularies from the counts; then rewrite the held rows in the pool."""
        for table, counter in zip(self.transform.tables, self.counters, strict=True):
            if table.encoding == "vocab" and table.vocabulary.size == 0:
                table.vocabulary = counter.vocabulary(self.config.min_count)
        self.counters = []
        if self.spill is not None:
            self.spill.flush()
            self.rewrites = [self.pool.submit(self.rewrite, *held) for held in self.pending]

    def rewrite(self, start: int, count: int, spans: list[tuple[int, int]]) -> None:
        """Turn one held chunk's positions among its distinct keys into vocabulary ids."""
        lookups = []
        for table, (offset, length) in zip(self.transform.tables, spans, strict=True):
            held = os.pread(self.spill.fileno(), 9 * length, offset)
            distinct = np.frombuffer(held, "<u8", length)
            missing = np.frombuffer(held, np.bool_, length, offset=8 * length)
            lookups.append(table.distinct_ids(distinct, missing))
        positions = self.sparse.read(start, count).reshape(count, len(spans), -1)
        self.sparse.write(start, squeeze(gathered_ids(lookups, positions)))

    def write_held_out(self, start: int, keys: list[ColumnKeys]) -> tuple[np.ndarray, np.ndarray]:
        """Encode and write validation/test rows (in the pool); their value counts."""
        ids = self.transform.encode(keys)
        self.sparse.write(start, ids)
        return value_counts(ids)

    def finish(self) -> None:
        """Wait until every row is encoded (the vocabularies complete)."""
        if self.counters:
            self.build_vocabularies()
        for rewrite in self.rewrites:
            rewrite.result()
        for task in self.held_out:
            self.summary.add_held_out(*task.result())
        self.close()

    def close(self) -> None:
        tasks = self.rewrites + self.held_out
        for task in tasks:  # none may write to a closed (or reused) descriptor
            task.cancel()
        wait(tasks)
        for f in (self.labels, self.dense, self.sparse, self.spill):
            if f is not None:
                f.close()


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
    workers = config.workers or len(os.sched_getaffinity(0))
    transform = new_transform(fmt, config)
    with ThreadPoolExecutor(workers, thread_name_prefix="mlet-data") as pool:
        parts = plan_parts(
            paths, fmt, config.part_bytes, config.max_rows, pool, progress=config.progress
        )
        rows = sum(part.rows for part in parts)
        if rows == 0:
            raise DataFormatError(f"{', '.join(map(str, paths))}: no rows")
        with staged_directory(out, replace=overwrite) as staging:
            conversion = Conversion(staging, transform, rows, config, pool)
            try:
                tasks = (pool.submit(task) for task in work(parts, transform, config.chunk_rows))
                # closed here, not by the garbage collector: on an error its thread must
                # stop before the pool shuts down (a finalizer may run in any thread)
                with contextlib.closing(prefetched(tasks, depth=workers + 1)) as done:
                    add_all(conversion, done, paths, config.progress)
                conversion.finish()
            finally:
                conversion.close()
            (staging / PENDING_KEYS).unlink(missing_ok=True)
            transform.save(staging)
            summary = conversion.summary.to_dict(transform, rows, time.perf_counter() - started)
            schema = dataset_schema(fmt, transform, paths, config, conversion.train_end, summary)
            write_json(staging / "schema.json", schema.to_dict())
    return schema


def add_all(conversion: Conversion, done: Iterator, paths: list[Path], progress: bool) -> None:
    """Add the chunks of each finished task in order, with a bar in rows and MB."""
    rows, total_bytes = conversion.rows, sum(p.stat().st_size for p in paths)
    with tqdm(total=rows, unit="row", unit_scale=True, disable=not progress) as bar:
        for task in done:
            for chunk in task.result():
                conversion.add(chunk)
                bar.update(chunk.rows)
            bar.set_postfix_str(f"{total_bytes * bar.n / rows / 1e6:,.0f} MB")


def dataset_schema(
    fmt: SourceFormat,
    transform: Transform,
    paths: list[Path],
    config: ConvertConfig,
    vocabulary_rows: int,
    summary: dict,
) -> DataSchema:
    return DataSchema(
        num_dense=len(fmt.dense),
        table_sizes=transform.table_sizes,
        hotness=transform.hotness,
        dense_transform=fmt.dense_transform,
        dense_names=fmt.dense,
        table_names=fmt.table_names,
        rows=summary["rows"],
        source={
            "kind": fmt.kind,
            "paths": [str(p.resolve()) for p in paths],
            "encoding": config.encoding,
            "min_count": config.min_count,
            "vocabulary_rows": vocabulary_rows,
            "split": {"val": config.val_fraction, "test": config.test_fraction},
            "summary": summary,
        },
    )
