"""Checks that artifacts are what their writer wrote: checksums, and weights that are numbers.

A model folder's manifest lists every file with its size and sha256; `verify_model_files`
compares the model files (the version folders) with it before a server loads them.
`config.pbtxt` is left out on purpose: as in Triton, it is the operator's to edit.

A run folder records the sha256 of its weights in checksums.json (`record_run_checksums`,
called when the run is written); export calls `mlet.run.verify_run` before reading them.
`check_finite_weights` refuses a weights file holding NaN or infinity, naming the tensor
(and the table and row, for embedding tables), before any of it reaches an exported model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlet.files import read_json, sha256_file, write_json
from mlet.weights import SafetensorsReader

CHECKSUMS_FILE = "checksums.json"
ROWS_PER_READ = 1 << 16
TABLE_KEY = re.compile(r"^embeddings\.tables\.(\d+)\.(table|projection)\.weight$")


def file_checksums(folder: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in names
    }


def mismatch(folder: Path, name: str, expected: dict, record: str = "the manifest") -> str | None:
    """Why file `name` of `folder` differs from its recorded size and sha256; None if it does
    not."""
    path = folder / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if "bytes" in expected and size != expected["bytes"]:
        return f"{path} holds {size} bytes, {record} says {expected['bytes']}"
    digest = sha256_file(path)
    if digest != expected.get("sha256"):
        return (
            f"{path} has sha256 {digest[:16]}..., {record} says "
            f"{str(expected.get('sha256'))[:16]}... (the file changed since)"
        )
    return None


def verify_model_files(
    model_folder: str | Path, files: dict, unchecked: frozenset[str] = frozenset()
) -> str | None:
    """Why the model files of `model_folder` do not match the manifest's `files` (path ->
    bytes, sha256); None when they do. Files named in `unchecked` are skipped."""
    folder = Path(model_folder)
    if not isinstance(files, dict) or not files:
        return f"{folder}: the manifest lists no files with their sha256"
    for name, expected in sorted(files.items()):
        if Path(name).name in unchecked:
            continue
        if not isinstance(expected, dict):
            return f"{folder}: the manifest's entry for {name} is not an object"
        reason = mismatch(folder, name, expected)
        if reason is not None:
            return reason
    return None


def record_run_checksums(run_folder: str | Path, names: list[str]) -> None:
    """Write checksums.json: size and sha256 of each named file of the run."""
    folder = Path(run_folder)
    write_json(folder / CHECKSUMS_FILE, file_checksums(folder, names))


def verify_run_checksums(run_folder: str | Path) -> None:
    """Raise ValueError when a file of the run differs from checksums.json.

    Runs written before checksums were recorded have no checksums.json and pass.
    """
    folder = Path(run_folder)
    if not (folder / CHECKSUMS_FILE).is_file():
        return
    recorded = read_json(folder / CHECKSUMS_FILE)
    if not isinstance(recorded, dict):
        raise ValueError(f"{folder / CHECKSUMS_FILE} must hold an object")
    for name, expected in sorted(recorded.items()):
        entry = expected if isinstance(expected, dict) else {}
        reason = mismatch(folder, name, entry, CHECKSUMS_FILE)
        if reason is not None:
            raise ValueError(f"run {folder} is damaged: {reason}")


def describe_tensor(name: str, table_names: list[str] | None) -> str:
    """`embeddings.tables.11.table.weight` -> `table C12 (embeddings.tables.11.table.weight)`."""
    match = TABLE_KEY.match(name)
    if match is None or table_names is None or int(match.group(1)) >= len(table_names):
        return f"tensor {name}"
    part = "" if match.group(2) == "table" else " projection"
    return f"table {table_names[int(match.group(1))]}{part} ({name})"


def first_non_finite(block: np.ndarray) -> tuple[int, ...] | None:
    bad = ~np.isfinite(block)
    return None if not bad.any() else tuple(int(i) for i in np.argwhere(bad)[0])


def check_finite_weights(
    path: str | Path,
    table_names: list[str] | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> None:
    """Raise ValueError naming the first tensor, row and column that holds NaN or infinity.

    Reads every floating tensor in row blocks, so a file larger than memory is checked too.
    """
    with SafetensorsReader(path) as reader:
        for name, entry in reader.entries.items():
            if entry.dtype.kind != "f":
                continue
            if not entry.shape:
                blocks = [(0, reader.read(name).reshape(1))]
            else:
                starts = range(0, entry.shape[0], ROWS_PER_READ)
                blocks = (
                    (s, reader.read_rows(name, s, min(s + ROWS_PER_READ, entry.shape[0])))
                    for s in starts
                )
            for start, block in blocks:
                where = first_non_finite(block)
                if where is None:
                    continue
                value = block[where]
                row = start + where[0]
                column = f", column {where[1]}" if len(where) > 1 else ""
                raise ValueError(
                    f"{path}: {describe_tensor(name, table_names)} holds {value} at row "
                    f"{row}{column}; a model with non-finite weights cannot be exported"
                )
        progress(f"weights of {path} are finite")
