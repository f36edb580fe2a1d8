"""`mlet predict`: raw rows -> click probabilities with an exported model.

The model folder carries the transform of its training data (transform.json and the
vocabularies, copied there by train and export), so scoring needs nothing else: rows are
read by the same front doors and encoded by the same `Transform` that `mlet data` ran,
values never seen in training land on their table's out-of-vocabulary row, and the dense
transform runs inside the graph. Scores come from ONNX Runtime in this process, or from a
KServe v2 server (`--url`) over HTTP or gRPC (`--protocol`), which with `--raw` gets the
logged columns themselves, for its NAME-raw model to encode. The output (CSV or Parquet)
is written to a temporary file and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mlet.encoding import value_counts
from mlet.formats import check_columns, file_columns, first_line, is_parquet, read_batches
from mlet.infer_request import (
    InputTensor,
    column_tensors,
    grpc_infer,
    grpc_output,
    grpc_request,
    grpc_stub,
    http_body,
    http_infer,
    json_output,
    spec_tensors,
)
from mlet.raw_rows import RAW_SUFFIX, batch_columns
from mlet.repository import OpenedModel, open_model
from mlet.runtime import SessionOptions, onnxruntime_session
from mlet.transform import TRANSFORM_FILE, Transform, load_transform
from mlet.variants import ONNX_PLATFORM

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


PROTOCOLS = ("http", "grpc")
PROBABILITY = "probability"


@dataclass(frozen=True)
class PredictConfig:
    url: str | None = None  # a KServe v2 server; None: ONNX Runtime in this process
    request_rows: int = 1024
    threads: int = 0
    timeout_s: float = 60.0
    raw: bool = False  # send the logged columns to the server's NAME-raw model instead
    protocol: str = "http"  # how to reach `url`: http, or grpc (url is then host:port)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.raw and not self.url:
            raise ValueError("raw rows go to a server's NAME-raw model: give --url too")
        if self.request_rows < 1:
            raise ValueError(f"request rows must be positive, got {self.request_rows}")


@dataclass
class PredictResult:
    rows: int
    seconds: float
    oov_share: float  # of the categorical values present, the share out of vocabulary
    out: Path


def model_transform(folder: Path) -> Transform:
    if not (folder / TRANSFORM_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {TRANSFORM_FILE}: export a run trained on a dataset written by "
            "`mlet data criteo|avazu|csv` (older datasets carry no vocabularies)"
        )
    return load_transform(folder)


def onnx_scorer(model: OpenedModel, threads: int) -> Scorer:
    if model.manifest.platform != ONNX_PLATFORM:
        raise ValueError(f"{model.folder} is a {model.manifest.platform} model: use --url")
    session = onnxruntime_session(model.model_path, SessionOptions(intra_op_threads=threads))
    spec = model.manifest.spec
    return lambda dense, sparse: session.run(None, spec.model_inputs(dense, sparse))[0]


def remote_infer(config: PredictConfig):
    """A function (model name, tensors) -> probabilities [B, 1] through the server at
    config.url, over HTTP (binary tensors, answered in JSON) or gRPC; a context manager,
    since a gRPC channel is closed when done."""
    if config.protocol == "grpc":
        return grpc_infer_function(config.url, config.timeout_s)
    return contextlib.nullcontext(http_infer_function(config.url, config.timeout_s))


def http_infer_function(url: str, timeout_s: float):
    def infer(model: str, tensors: list[InputTensor]) -> np.ndarray:
        answer = http_infer(url, model, *http_body(tensors, binary=True), timeout_s)
        return json_output(answer, PROBABILITY, f"model {model!r} at {url}")

    return infer


@contextlib.contextmanager
def grpc_infer_function(url: str, timeout_s: float):
    with grpc_stub(url) as stub:

        def infer(model: str, tensors: list[InputTensor]) -> np.ndarray:
            request = grpc_request(model, tensors, outputs=(PROBABILITY,))
            return grpc_output(grpc_infer(stub, request, timeout_s), PROBABILITY)

        yield infer


def remote_scorer(infer, model: OpenedModel) -> Scorer:
    """Scores ids with the served model."""
    spec = model.manifest.spec
    return lambda dense, sparse: infer(
        model.name, spec_tensors(spec, spec.model_inputs(dense, sparse))
    )


def raw_scorer(infer, model: OpenedModel):
    """Scores logged columns with the server's NAME-raw model (its transform step encodes)."""
    return lambda columns: infer(f"{model.name}{RAW_SUFFIX}", column_tensors(columns))


class OutputWriter:
    """Streams (row, [label,] probability) batches to a temporary CSV/Parquet file."""

    def __init__(self, out: Path, schema: pa.Schema) -> None:
        if out.suffix not in (".csv", ".parquet"):
            raise ValueError(f"{out}: the output must end in .csv or .parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        self.out, self.tmp = out, Path(tmp)
        if out.suffix == ".parquet":
            self.writer = pq.ParquetWriter(self.tmp, schema)
        else:
            self.writer = pacsv.CSVWriter(str(self.tmp), schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def predict_files(
    model: str | Path, sources: list[str | Path], out: str | Path, config: PredictConfig
) -> PredictResult:
    """Score every row of `sources` with the model folder `model`; write `out`."""
    folder, out = Path(model), Path(out)
    opened = open_model(folder)
    transform = model_transform(folder)
    paths = [Path(p) for p in sources]
    has_label = all_have_label(paths, transform)
    if not has_label:
        transform = replace(transform, fmt=transform.fmt.without_label())
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        check_columns(path, transform.fmt, file_columns(path, transform.fmt))
    with contextlib.ExitStack() as stack:
        if config.url:
            infer = stack.enter_context(remote_infer(config))
            score, score_raw = remote_scorer(infer, opened), raw_scorer(infer, opened)
        else:
            score, score_raw = onnx_scorer(opened, config.threads), None
        return score_files(paths, transform, has_label, out, config, score, score_raw)


def score_files(paths, transform, has_label, out: Path, config, score, score_raw):
    """Score every batch of `paths` (ids, or raw columns with config.raw) into `out`."""
    fields = [("row", pa.int64())] + ([("label", pa.uint8())] if has_label else [])
    writer = OutputWriter(out, pa.schema([*fields, ("probability", pa.float32())]))
    vocab_tables = np.array([t.encoding == "vocab" for t in transform.tables], bool)
    started, rows, present, oov = time.perf_counter(), 0, 0, 0
    try:
        for path in paths:
            line = 1 + (1 if transform.fmt.header else 0)
            for batch in read_batches(path, transform.fmt):
                features = transform.features(batch, str(path), line)
                ids = transform.encode(features.keys)
                if not config.raw:
                    probability = score_in_requests(score, features.dense, ids, config.request_rows)
                else:
                    probability = score_raw_in_requests(score_raw, transform.fmt, batch, config)
                columns = {"row": np.arange(rows, rows + batch.num_rows)}
                if has_label:
                    columns["label"] = features.labels
                writer.write(pa.table(columns | {"probability": probability}))
                table_values, table_oov = value_counts(ids)
                present += int(table_values[vocab_tables].sum())
                oov += int(table_oov[vocab_tables].sum())
                rows, line = rows + batch.num_rows, line + batch.num_rows
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    seconds = time.perf_counter() - started
    return PredictResult(rows, seconds, oov / present if present else 0.0, out)


def all_have_label(paths: list[Path], transform: Transform) -> bool:
    """Whether every file carries the label column (files without header: by field count)."""
    fmt = transform.fmt
    if not fmt.label:
        return False
    for path in paths:
        if fmt.header or is_parquet(path):
            if fmt.label not in file_columns(path, fmt):
                return False
            continue
        fields = len(first_line(path).split(fmt.delimiter))
        if fields == len(fmt.columns) - 1:
            return False
    return True


def score_in_requests(score: Scorer, dense: np.ndarray, ids: np.ndarray, rows: int) -> np.ndarray:
    """Probabilities [B] for a batch, in calls of at most `rows` rows."""
    sparse = ids.astype(np.int64)
    parts = [
        score(dense[i : i + rows], sparse[i : i + rows]).reshape(-1)
        for i in range(0, len(dense), rows)
    ]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def score_raw_in_requests(score_raw, fmt, batch: pa.RecordBatch, config: PredictConfig):
    """Probabilities [B] of a batch's logged columns, in requests of at most request_rows."""
    parts = [
        score_raw(batch_columns(fmt.without_label(), batch.slice(i, config.request_rows)))
        for i in range(0, batch.num_rows, config.request_rows)
    ]
    return (
        np.concatenate(parts).reshape(-1).astype(np.float32) if parts else np.zeros(0, np.float32)
    )
