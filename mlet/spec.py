"""One declarative description of an exported model.

Input and output names, dtypes and shapes, opset, batch limits, tolerances and the
generator of valid inputs live here; the ONNX lowering, the parity checks, the Triton
config, the manifest and the server's validation all read it.

Signature (every backend): dense FP32 [B, F], sparse INT64 [B, T] or [B, T, H],
probability FP32 [B, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from mlet.variants import VARIANTS

if TYPE_CHECKING:  # the server reads specs without importing torch
    from mlet.dlrm import DLRMConfig

OPSET = 18
DEFAULT_MAX_BATCH = 4096
DEFAULT_PREFERRED_BATCHES = (64, 256, 1024)
# KServe v2 datatype names and the NumPy dtypes they carry.
# BYTES (the raw-row models' logged columns) holds one bytes object per element.
DATATYPES = {
    "FP32": np.float32,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "BYTES": np.object_,
}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; shape excludes the batch dimension, which is always dynamic."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DATATYPES[self.datatype])

    def metadata(self) -> dict:
        """KServe v2 metadata: the batch dimension reads -1."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}


class NamedTensors:
    """The input and output names of a spec that has `inputs` and `outputs` tensors."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ExportSpec(NamedTensors):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    table_rows: tuple[int, ...]
    table_names: tuple[str, ...]
    max_batch_size: int = DEFAULT_MAX_BATCH
    preferred_batch_sizes: tuple[int, ...] = DEFAULT_PREFERRED_BATCHES
    max_queue_delay_us: int = 500
    opset: int = OPSET
    tolerance: float = 1e-4

    @property
    def sparse_input(self) -> TensorSpec:
        return self.inputs[-1]

    @property
    def dense_input(self) -> TensorSpec | None:
        """None for a model without numeric features (e.g. Avazu): it has no `dense` input."""
        return self.inputs[0] if len(self.inputs) > 1 else None

    def model_inputs(self, dense: np.ndarray, sparse: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays the model takes, by input name: `dense` only where the model has one."""
        arrays = {self.sparse_input.name: sparse}
        if self.dense_input is not None:
            arrays = {self.dense_input.name: dense, **arrays}
        return arrays

    def random_inputs(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Valid inputs of a given batch: non-negative counts and ids within each table."""
        sparse_spec = self.sparse_input
        dense = np.floor(rng.exponential(10.0, size=(batch, self.num_dense)))
        rows = np.asarray(self.table_rows).reshape(-1, *([1] * (len(sparse_spec.shape) - 1)))
        sparse = np.floor(rng.random((batch, *sparse_spec.shape)) * rows)
        return self.model_inputs(dense.astype(np.float32), sparse.astype(sparse_spec.dtype))

    @property
    def num_dense(self) -> int:
        return self.dense_input.shape[0] if self.dense_input is not None else 0

    def batch_profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of a TensorRT optimization profile: opt is a typical batch."""
        return 1, max(self.preferred_batch_sizes), self.max_batch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExportSpec:
        # earlier versions also wrote parity_rows and extra, which nothing reads
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("inputs", "outputs"):
            data[key] = tuple(
                TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in data[key]
            )
        for key in ("table_rows", "table_names", "preferred_batch_sizes"):
            data[key] = tuple(data[key])
        return cls(**data)


def spec_for(
    config: DLRMConfig, max_batch_size: int = DEFAULT_MAX_BATCH, variant: str = "fp32"
) -> ExportSpec:
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be positive, got {max_batch_size}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    tables = len(config.tables)
    sparse_shape = (tables,) if config.hotness == 1 else (tables, config.hotness)
    preferred = tuple(b for b in DEFAULT_PREFERRED_BATCHES if b <= max_batch_size)
    return ExportSpec(
        inputs=(
            *([TensorSpec("dense", "FP32", (config.num_dense,))] if config.num_dense else []),
            TensorSpec("sparse", "INT64", sparse_shape),
        ),
        outputs=(TensorSpec("probability", "FP32", (1,)),),
        table_rows=tuple(t.rows for t in config.tables),
        table_names=tuple(t.name for t in config.tables),
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred or (max_batch_size,),
        tolerance=VARIANTS[variant].tolerance,
    )
