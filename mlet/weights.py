"""Read and write .safetensors files in row blocks, never holding a large tensor whole.

A run's weights file can be far larger than memory (an MLET table of 10 million rows at
K=64 is 2.6 GB of W1). `SafetensorsReader` reads row ranges and single rows with plain
positioned reads instead of a memory map: pages of a mapped file count towards the
process's resident memory once touched, pages read with pread stay in the kernel's page
cache, which the kernel can drop. `SafetensorsWriter` writes a file tensor by tensor and
block by block in the same format (8-byte little-endian header length, a JSON header with
each tensor's dtype, shape and byte range, then the tensors' bytes back to back), so that
`safetensors.safe_open` and `load_file` read it like any other.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsReader:
    """Random access to the tensors of one .safetensors file by positioned reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries, self.metadata = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> tuple[dict[str, TensorEntry], dict]:
        size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{self.path} is not a safetensors file (header of {header_bytes} B)")
        try:
            header = json.loads(os.pread(self._fd, header_bytes, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: the safetensors header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: the safetensors header must be a JSON object")
        metadata = header.pop("__metadata__", {}) or {}
        start = 8 + header_bytes
        entries = {}
        for name, info in header.items():
            entries[name] = self._entry(name, info, start, size)
        return entries, metadata

    def _entry(self, name: str, info, start: int, size: int) -> TensorEntry:
        """One header entry checked field by field, so a damaged file says what is wrong."""
        where = f"{self.path}: tensor {name}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: its header entry is not an object")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
        if missing:
            raise ValueError(f"{where}: its header entry lacks {missing}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise ValueError(f"{where} has unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_natural, offsets)):
            raise ValueError(f"{where}: data_offsets {offsets!r} are not two byte offsets")
        dtype = np.dtype(DTYPES[info["dtype"]])
        begin, end = start + offsets[0], start + offsets[1]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or end > size:
            raise ValueError(f"{where} has a byte range that does not fit")
        return TensorEntry(name, dtype, tuple(shape), begin, end)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        """The whole tensor (for small ones)."""
        entry = self.entry(name)
        return self.read_rows(name, 0, entry.shape[0]) if entry.shape else self._scalar(entry)

    def _scalar(self, entry: TensorEntry) -> np.ndarray:
        data = self._pread(entry.begin, entry.end - entry.begin)
        return np.frombuffer(data, dtype=entry.dtype).reshape(())

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as a new array."""
        entry = self.entry(name)
        if not 0 <= start <= stop <= entry.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) outside {name} of {entry.shape[0]} rows")
        data = self._pread(entry.begin + start * entry.row_bytes, (stop - start) * entry.row_bytes)
        return np.frombuffer(data, dtype=entry.dtype).reshape(stop - start, *entry.shape[1:])

    def take_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows at sorted unique `ids`, reading each run of consecutive ids at once."""
        entry = self.entry(name)
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), *entry.shape[1:]), dtype=entry.dtype)
        if len(ids) == 0:
            return out
        if ids[0] < 0 or ids[-1] >= entry.shape[0] or np.any(np.diff(ids) <= 0):
            raise IndexError(
                f"ids must be sorted, unique and within {name}'s {entry.shape[0]} rows"
            )
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        for first, last in zip(
            np.concatenate([[0], breaks]), np.concatenate([breaks, [len(ids)]]), strict=True
        ):
            out[first:last] = self.read_rows(name, int(ids[first]), int(ids[last - 1]) + 1)
        return out

    def _pread(self, offset: int, length: int) -> bytes:
        chunks = []
        while length > 0:
            chunk = os.pread(self._fd, min(length, 1 << 30), offset)
            if not chunk:
                raise ValueError(f"{self.path} ends before byte {offset + length}")
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class SafetensorsWriter:
    """Write a .safetensors file whose tensors arrive in row blocks, in the declared order.

    layout: name -> (dtype, shape) for every tensor, declared before any data is written.
    """

    def __init__(
        self,
        path: str | Path,
        layout: dict[str, tuple[np.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._order = list(layout)
        self._remaining = {}
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, (dtype, shape) in layout.items():
            dtype = np.dtype(dtype)
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be written")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._remaining[name] = (dtype, tuple(shape[1:]), nbytes)
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, block: np.ndarray) -> None:
        """Append rows to `name`, which must be the first tensor not yet complete."""
        expected = next((n for n in self._order if self._remaining[n][2]), None)
        if name != expected:
            raise ValueError(f"expected rows of {expected!r}, got rows of {name!r}")
        dtype, row_shape, left = self._remaining[name]
        block = np.ascontiguousarray(block, dtype=dtype)
        if tuple(block.shape[1:]) != row_shape and not (row_shape == () and block.ndim == 1):
            raise ValueError(f"rows of {name} must have shape {row_shape}, got {block.shape[1:]}")
        if block.nbytes > left:
            raise ValueError(f"too many rows for {name}")
        self._file.write(block.data)
        self._remaining[name] = (dtype, row_shape, left - block.nbytes)

    def close(self) -> None:
        """Finish the file; raises if a declared tensor is incomplete."""
        incomplete = [name for name, (_, _, left) in self._remaining.items() if left]
        self._file.close()
        if incomplete:
            raise ValueError(f"{self.path}: tensors not written in full: {incomplete}")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
