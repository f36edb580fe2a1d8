"""Request bodies drawn like the data: skewed ids, realistic counts, or raw logged values,
in JSON, binary or gRPC form (encoded by mlet.infer_request)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlet.infer_request import (
    InputTensor,
    column_tensors,
    http_body,
    spec_tensors,
)
from mlet.raw_rows import RAW_SUFFIX, TRANSFORM_SUFFIX, raw_columns
from mlet.repository import open_model
from mlet.spec import ExportSpec
from mlet.transform import Transform, load_transform
from mlet.zipf import ZipfSampler

RAW_VALUES = 4096  # distinct values drawn per categorical column of a raw request
FIRST_HOUR = 14102100  # Avazu's first YYMMDDHH
MISSING_SHARE = 0.1  # of the numeric values of raw requests


def logged_counts(rng: np.random.Generator, shape) -> np.ndarray:
    """Counts like Criteo's numeric columns: mostly small, a long tail."""
    return np.floor(np.expm1(np.maximum(rng.normal(2.0, 1.0, shape), 0)))


class RequestFactory:
    """Draws inference inputs whose ids follow a Zipf law per table, like production traffic,
    or whatever samplers it is given."""

    def __init__(
        self, spec: ExportSpec, zipf_exponent: float = 1.05, seed: int = 0, samplers=None
    ) -> None:
        """`samplers`: one per table (anything with `sample(size, rng)`) in place of Zipf's."""
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        if samplers is None:
            samplers = [ZipfSampler(n, zipf_exponent, self.rng) for n in spec.table_rows]
        self.samplers = samplers

    def inputs(self, rows: int) -> dict[str, np.ndarray]:
        sparse_spec = self.spec.sparse_input
        dense = logged_counts(self.rng, (rows, self.spec.num_dense))
        extra = sparse_spec.shape[1:]
        sparse = np.stack([s.sample((rows, *extra), self.rng) for s in self.samplers], axis=1)
        return self.spec.model_inputs(dense.astype(np.float32), sparse.astype(sparse_spec.dtype))

    def tensors(self, rows: int) -> list[InputTensor]:
        return spec_tensors(self.spec, self.inputs(rows))

    def body(self, rows: int, binary: bool) -> tuple[bytes, dict[str, str]]:
        """An infer request body and its headers; binary uses the binary tensor extension."""
        return http_body(self.tensors(rows), binary, binary_output=binary)


def encode_inputs(
    spec: ExportSpec, inputs: dict[str, np.ndarray], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """A body for a model's inputs; binary asks for binary outputs too."""
    return http_body(spec_tensors(spec, inputs), binary, binary_output=binary)


class RawRequestFactory:
    """Draws logged columns for a model's NAME-raw that its transform accepts.

    Numeric columns are counts like Criteo's, a tenth of them missing (NaN, which JSON
    carries as the NaN token). A categorical column of hexadecimal keys (Criteo) takes
    values of its vocabulary, Zipf distributed; string keys are hashes that cannot be read
    back, so such a column (Avazu, CSV) and a hashed table take generated values, most of
    them out of vocabulary, which costs the transform the same lookup. Multi-hot columns
    join up to H values; Avazu's hour is a valid YYMMDDHH.
    """

    def __init__(self, transform: Transform, zipf_exponent: float = 1.05, seed: int = 0) -> None:
        self.transform = transform
        self.fmt = transform.fmt.without_label()
        self.rng = np.random.default_rng(seed)
        self.values = {
            name: self.column_values(name, table)
            for name, table in zip(self.fmt.categorical, transform.tables, strict=False)
        }
        self.samplers = {
            name: ZipfSampler(len(values), zipf_exponent, self.rng)
            for name, values in self.values.items()
        }

    def column_values(self, name: str, table) -> np.ndarray:
        """The distinct values a categorical column's requests draw from."""
        vocabulary = table.vocabulary if table.encoding == "vocab" else None
        if self.fmt.keys == "hex" and vocabulary is not None and len(vocabulary):
            keys = np.asarray(vocabulary[:RAW_VALUES])
        else:
            keys = self.rng.integers(0, 2**32, RAW_VALUES, dtype=np.uint64)
        if self.fmt.keys == "hex":
            return np.array([f"{int(k):08x}".encode() for k in keys], dtype=object)
        return np.array([f"{name}-{int(k):x}".encode() for k in keys], dtype=object)

    def column(self, name: str, rows: int) -> np.ndarray:
        """One categorical column [B, 1]: one value, or up to H joined for multi-hot."""
        values, sampler = self.values[name], self.samplers[name]
        separator = self.fmt.multi_hot.get(name)
        if separator is None:
            return values[sampler.sample(rows, self.rng)].reshape(-1, 1)
        counts = self.rng.integers(1, self.transform.hotness + 1, rows)
        joined = [separator.encode().join(values[sampler.sample(n, self.rng)]) for n in counts]
        return np.array(joined, dtype=object).reshape(-1, 1)

    def columns(self, rows: int) -> dict[str, np.ndarray]:
        """The raw-row model's inputs [B, 1] by column name, in its input order."""
        columns = {}
        for column in raw_columns(self.fmt):
            if column.datatype == "FP32":
                counts = logged_counts(self.rng, (rows, 1)).astype(np.float32)
                counts[self.rng.random((rows, 1)) < MISSING_SHARE] = np.nan
                columns[column.name] = counts
            elif column.name == self.fmt.hour:
                hours = FIRST_HOUR + self.rng.integers(0, 24, rows)
                columns[column.name] = np.array([str(h).encode() for h in hours], object)[:, None]
            else:
                columns[column.name] = self.column(column.name, rows)
        return columns

    def tensors(self, rows: int) -> list[InputTensor]:
        return column_tensors(self.columns(rows))


def request_factory(folder: Path, raw: bool, zipf_exponent: float = 1.05, seed: int = 0):
    """Id requests for the model folder, or (raw) logged columns for its NAME-raw."""
    if raw:
        return RawRequestFactory(load_transform(folder), zipf_exponent, seed)
    return RequestFactory(open_model(folder).manifest.spec, zipf_exponent, seed)


def served_name(folder: Path, raw: bool) -> str:
    """The model a load calls: the folder's, or its NAME-raw."""
    return folder.name + (RAW_SUFFIX if raw else "")


def served_models(model: str, raw: bool) -> list[str]:
    """The models a server loads for a load on `model`: with raw, its ensemble and steps."""
    return [model, f"{model}{TRANSFORM_SUFFIX}", f"{model}{RAW_SUFFIX}"] if raw else [model]


def require_raw_models(repo: Path, models: list[str]) -> None:
    """Refuse, naming them, models without a NAME-raw beside them in the repository."""
    missing = [m for m in models if not (Path(repo) / f"{m}{RAW_SUFFIX}").is_dir()]
    if missing:
        raise FileNotFoundError(
            f"no raw-row model beside {missing} in {repo}: export writes NAME-raw for models "
            "trained on a dataset that carries its transform (mlet data criteo|avazu|csv)"
        )
