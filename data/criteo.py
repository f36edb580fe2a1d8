"""Reader for the Criteo TSV format into the project's dataset folder.

Each line: label, I1..I13 (integer counts, may be empty or negative), C1..C26 (32-bit
hexadecimal hashes, may be empty), separated by tabs. Empty counts become 0; negative
counts are kept raw (the model's transform clamps them at 0). Categorical values are
mapped into each table's range as int(value, 16) mod rows, as DLRM's reference
preprocessing does; an empty value maps to id 0.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlet.dataset import DataSchema, open_array
from mlet.files import staged_directory, write_json

NUM_DENSE = 13
NUM_SPARSE = 26
FIELDS = 1 + NUM_DENSE + NUM_SPARSE


class CriteoFormatError(ValueError):
    """A line that is not in the Criteo TSV format."""


@dataclass(frozen=True)
class CriteoConfig:
    table_sizes: tuple[int, ...] = (100_000,) * NUM_SPARSE
    max_rows: int | None = None
    chunk_rows: int = 100_000

    def __post_init__(self) -> None:
        if len(self.table_sizes) != NUM_SPARSE:
            raise ValueError(f"Criteo needs {NUM_SPARSE} table sizes, got {len(self.table_sizes)}")


def parse_line(
    line: str, table_sizes: tuple[int, ...], where: str = "line"
) -> tuple[int, list[float], list[int]]:
    """One TSV line -> (label, 13 dense values, 26 ids within their tables)."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != FIELDS:
        raise CriteoFormatError(
            f"{where}: expected {FIELDS} tab-separated fields, got {len(fields)}"
        )
    label_text, dense_text, sparse_text = (
        fields[0],
        fields[1 : 1 + NUM_DENSE],
        fields[1 + NUM_DENSE :],
    )
    if label_text not in ("0", "1"):
        raise CriteoFormatError(f"{where}: label must be 0 or 1, got {label_text!r}")
    try:
        dense = [float(int(v)) if v else 0.0 for v in dense_text]
    except ValueError as e:
        raise CriteoFormatError(f"{where}: a dense field is not an integer ({e})") from e
    try:
        sparse = [int(v, 16) % n if v else 0 for v, n in zip(sparse_text, table_sizes, strict=True)]
    except ValueError as e:
        raise CriteoFormatError(f"{where}: a categorical field is not hexadecimal ({e})") from e
    return int(label_text), dense, sparse


def open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def count_rows(path: Path) -> int:
    with open_text(path) as f:
        return sum(1 for line in f if line.strip())


def read_chunks(
    path: Path, config: CriteoConfig
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(labels, dense, sparse) arrays of up to chunk_rows rows each."""
    labels, dense, sparse = [], [], []
    rows = 0
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            label, d, s = parse_line(line, config.table_sizes, where=f"{path}:{number}")
            labels.append(label)
            dense.append(d)
            sparse.append(s)
            rows += 1
            if len(labels) == config.chunk_rows or rows == config.max_rows:
                yield _arrays(labels, dense, sparse)
                labels, dense, sparse = [], [], []
            if rows == config.max_rows:
                return
    if labels:
        yield _arrays(labels, dense, sparse)


def _arrays(labels, dense, sparse):
    return (
        np.asarray(labels, dtype=np.uint8),
        np.asarray(dense, dtype=np.float32),
        np.asarray(sparse, dtype=np.int32),
    )


def convert(source: str | Path, out: str | Path, config: CriteoConfig, overwrite: bool = False):
    """Convert a Criteo TSV file (optionally .gz) into a dataset folder at `out`."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    rows = count_rows(source)
    if config.max_rows is not None:
        rows = min(rows, config.max_rows)
    if rows == 0:
        raise CriteoFormatError(f"{source} holds no rows")
    schema = DataSchema(
        num_dense=NUM_DENSE,
        table_sizes=config.table_sizes,
        dense_transform="log1p",
        rows=rows,
        source={"kind": "criteo", "path": str(source.resolve()), "hashing": "int(hex) mod rows"},
    )
    with staged_directory(out, replace=overwrite) as staging:
        dense = open_array(staging, "dense", (rows, NUM_DENSE), np.float32)
        sparse = open_array(staging, "sparse", (rows, NUM_SPARSE), np.int32)
        labels = open_array(staging, "labels", (rows,), np.uint8)
        start = 0
        with tqdm(total=rows, desc=f"reading {source.name}", unit="row", unit_scale=True) as bar:
            for chunk_labels, chunk_dense, chunk_sparse in read_chunks(source, config):
                stop = start + len(chunk_labels)
                labels[start:stop], dense[start:stop], sparse[start:stop] = (
                    chunk_labels,
                    chunk_dense,
                    chunk_sparse,
                )
                start = stop
                bar.update(len(chunk_labels))
        for array in (dense, sparse, labels):
            array.flush()
        del dense, sparse, labels
        write_json(staging / "schema.json", schema.to_dict())
    return schema
