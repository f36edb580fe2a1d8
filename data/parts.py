"""Input files cut into parts that threads read at the same time, each knowing its rows.

    plain CSV/TSV   byte ranges of about `part_bytes`, each ending at a newline (pyarrow
                    parses with newlines_in_values off, so a newline always ends a row)
    Parquet         one part per row group
    gzip            one part per file: a deflate stream cannot be entered in the middle

Rows are counted per part before any part is parsed (newlines, or Parquet metadata), so
every part knows the dataset row it starts at and the split is known before reading.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import os
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mlet.formats import (
    DataFormatError,
    SourceFormat,
    csv_reader,
    file_columns,
    is_gzip,
    is_parquet,
    located,
    parquet_group,
    read_batches,
)

COUNT_BLOCK_BYTES = 1 << 20  # fresh 16 MiB blocks page-fault: counting cost twice as much
NEWLINE = ord("\n")


@dataclass(frozen=True)
class Part:
    """Rows [start, start + rows) of the dataset: `rows` rows of `path` after its first
    `file_row` rows, at byte `offset` (plain files) or in row group `offset` (Parquet)."""

    path: Path
    offset: int
    length: int
    rows: int
    file_row: int
    start: int = 0

    @property
    def whole_file(self) -> bool:
        return is_gzip(self.path)


def plan_parts(
    paths: list[Path],
    fmt: SourceFormat,
    part_bytes: int,
    max_rows: int | None,
    pool: Executor,
    progress: bool = False,
) -> list[Part]:
    """The parts of the files in order, rows counted in `pool`, cut after `max_rows` rows
    (a bar in parts counted: a gzip file is decompressed once to count its lines)."""
    pieces = [piece for path in paths for piece in file_pieces(path, fmt, part_bytes)]
    counts = [pool.submit(count_piece, piece, fmt) for piece in pieces]
    parts, start, file_row = [], 0, 0
    bar = tqdm(total=len(pieces), desc="counting rows", unit="part", disable=not progress)
    for i, (piece, count) in enumerate(zip(pieces, counts, strict=True)):
        if i and piece.path != pieces[i - 1].path:
            file_row = 0
        rows = count.result()
        bar.update()
        kept = rows if max_rows is None else min(rows, max_rows - start)
        if kept > 0:
            parts.append(replace(piece, rows=kept, file_row=file_row, start=start))
            start += kept
        file_row += rows
        if max_rows is not None and start >= max_rows:
            for later in counts[i + 1 :]:
                later.cancel()
            bar.total = bar.n  # enough rows: the later parts are not needed
            break
    bar.close()
    return parts


def file_pieces(path: Path, fmt: SourceFormat, part_bytes: int) -> list[Part]:
    """A file's parts before their rows are counted."""
    if is_parquet(path):
        groups = pq.ParquetFile(path).metadata.num_row_groups
        return [Part(path, group, 0, -1, 0) for group in range(groups)]
    if is_gzip(path):
        return [Part(path, 0, 0, -1, 0)]
    ranges = byte_ranges(path, header_bytes(path, fmt), part_bytes)
    return [Part(path, offset, length, -1, 0) for offset, length in ranges]


def count_piece(part: Part, fmt: SourceFormat) -> int:
    if is_parquet(part.path):
        return pq.ParquetFile(part.path).metadata.row_group(part.offset).num_rows
    if part.whole_file:
        return count_gzip_rows(part.path, fmt)
    return count_lines(part.path, part.offset, part.length)


def header_bytes(path: Path, fmt: SourceFormat) -> int:
    if not fmt.header:
        return 0
    with open(path, "rb") as f:
        return len(f.readline())


def byte_ranges(path: Path, begin: int, part_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) ranges from `begin` to the end, each cut just after a newline."""
    size = path.stat().st_size
    cuts = [begin]
    with open(path, "rb") as f:
        while cuts[-1] + part_bytes < size:
            f.seek(cuts[-1] + part_bytes)
            cut = f.tell() + len(f.readline())
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return [(a, b - a) for a, b in itertools.pairwise(cuts) if b > a]


def count_lines(path: Path, offset: int, length: int) -> int:
    """Lines in a byte range; a last line without a newline counts."""
    with open(path, "rb") as f:
        return lines_in(range_blocks(f.fileno(), offset, length))


def count_gzip_rows(path: Path, fmt: SourceFormat) -> int:
    """Data rows of a gzip file: its lines, less the header."""
    try:
        with gzip.open(path, "rb") as f:
            lines = lines_in(iter(functools.partial(f.read, COUNT_BLOCK_BYTES), b""))
    except gzip.BadGzipFile as e:
        raise DataFormatError(f"{path}: not a gzip file ({e})") from e
    except (EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: truncated or corrupt gzip file ({e})") from e
    return max(lines - (1 if fmt.header else 0), 0)


def range_blocks(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """The bytes [offset, offset + length) of a file, in blocks."""
    end = offset + length
    while offset < end and (block := os.pread(fd, min(COUNT_BLOCK_BYTES, end - offset), offset)):
        yield block
        offset += len(block)


def lines_in(blocks: Iterable[bytes]) -> int:
    """Lines in a stream of blocks; a last line without a newline counts. numpy counts
    without holding the GIL, so parts are counted in parallel."""
    lines, last = 0, b"\n"
    for block in blocks:
        lines += int(np.count_nonzero(np.frombuffer(block, np.uint8) == NEWLINE))
        last = block[-1:]
    return lines + (last != b"\n")


def read_part(part: Part, fmt: SourceFormat, whole_dense: bool = False) -> Iterator[pa.RecordBatch]:
    """The part's rows as record batches of the needed columns (at most `part.rows`).

    `whole_dense` (text parts only) parses dense values as int64 and lets pyarrow's error
    through as it is, for a caller that then reads the part as floats.
    """
    if part.whole_file:
        batches = read_batches(part.path, fmt)
    elif is_parquet(part.path):
        batches = parquet_group(pq.ParquetFile(part.path), part.offset, part.path, fmt)
    else:
        names = file_columns(part.path, fmt)

        def reader() -> Iterator[pa.RecordBatch]:
            text = part_text(part)
            return csv_reader(text, fmt, names, use_threads=False, whole_dense=whole_dense)

        batches = reader() if whole_dense else located(reader, part.path, fmt, part.file_row)
    left = part.rows
    for batch in batches:
        if batch.num_rows > left:
            batch = batch.slice(0, left)
        left -= batch.num_rows
        if batch.num_rows:
            yield batch
        if left == 0:
            return


def part_text(part: Part) -> pa.BufferReader:
    """The bytes of a text part, in memory."""
    with pa.OSFile(str(part.path)) as f:
        return pa.BufferReader(f.read_at(part.length, part.offset))


def whole_dense_first(part: Part, fmt: SourceFormat) -> bool:
    """Whether to parse a part's dense values as integers first: Criteo's text parts,
    whose dense values are counts (a gzip file cannot be parsed again cheaply)."""
    return fmt.kind == "criteo" and not part.whole_file and not is_parquet(part.path)
