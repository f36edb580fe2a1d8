"""The on-disk dataset format every source is converted into.

A dataset folder holds memory-mappable NumPy arrays and a schema:

    schema.json   feature counts, table sizes, hotness, dense transform, source
    dense.npy     float32 [N, F]   raw dense values (the model applies the transform)
    sparse.npy    int32   [N, T] or [N, T, H]   ids, each within its table's rows
    labels.npy    uint8   [N]      0 or 1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlet.files import read_json, write_json

FORMAT_VERSION = 1
ARRAYS = ("dense", "sparse", "labels")


@dataclass(frozen=True)
class DataSchema:
    """What a model needs to know about its data: F dense features, T tables of given rows."""

    num_dense: int
    table_sizes: tuple[int, ...]
    hotness: int = 1
    dense_transform: str = "log1p"
    dense_names: tuple[str, ...] = ()
    table_names: tuple[str, ...] = ()
    rows: int = 0
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dense_names:
            object.__setattr__(
                self, "dense_names", tuple(f"I{i + 1}" for i in range(self.num_dense))
            )
        if not self.table_names:
            names = tuple(f"C{i + 1}" for i in range(len(self.table_sizes)))
            object.__setattr__(self, "table_names", names)
        if len(self.dense_names) != self.num_dense:
            raise ValueError("dense_names must name every dense feature")
        if len(self.table_names) != len(self.table_sizes):
            raise ValueError("table_names must name every table")
        if any(n < 1 or n >= 2**31 for n in self.table_sizes):
            raise ValueError(f"table sizes must be in [1, 2^31), got {self.table_sizes}")

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DataSchema:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported dataset format version {version}")
        for key in ("table_sizes", "dense_names", "table_names"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


@dataclass
class Dataset:
    """A dataset opened from disk; arrays are memory-mapped, not read."""

    schema: DataSchema
    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def save_dataset(directory: str | Path, schema: DataSchema, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays and schema into `directory` (which the caller stages atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(directory / f"{name}.npy", arrays[name])
    write_json(directory / "schema.json", schema.to_dict())


def open_array(directory: Path, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Create a .npy file of known shape to be filled in chunks (memory-mapped)."""
    return np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def load_dataset(directory: str | Path) -> Dataset:
    directory = Path(directory)
    if not (directory / "schema.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a dataset folder (no schema.json); create one with "
            "`mlet data synth` or `mlet data criteo`"
        )
    schema = DataSchema.from_dict(read_json(directory / "schema.json"))
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    check_arrays(schema, arrays, directory)
    return Dataset(schema=schema, **arrays)


def check_arrays(schema: DataSchema, arrays: dict[str, np.ndarray], where: Path) -> None:
    rows = len(arrays["labels"])
    expected = {
        "dense": (rows, schema.num_dense),
        "sparse": (rows, schema.num_tables) + ((schema.hotness,) if schema.hotness > 1 else ()),
        "labels": (rows,),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{where}/{name}.npy has shape {arrays[name].shape}, expected {shape}")


@dataclass(frozen=True)
class Split:
    """Contiguous train/val/test row ranges; the last rows are the test set, as in Criteo."""

    train: range
    val: range
    test: range


def split_rows(rows: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val and test fractions must be in (0, 1) and sum below 1")
    test_start = rows - int(round(rows * test_fraction))
    val_start = test_start - int(round(rows * val_fraction))
    if val_start < 1 or test_start <= val_start or test_start >= rows:
        raise ValueError(f"{rows} rows are too few to split into train, val and test")
    return Split(
        train=range(0, val_start), val=range(val_start, test_start), test=range(test_start, rows)
    )
