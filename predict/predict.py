"""`mlet predict`: raw rows -> click probabilities with an exported model.

The model folder carries the transform of its training data (transform.json and the
vocabularies, copied there by train and export), so scoring needs nothing else: rows are
read by the same front doors and encoded by the same `Transform` that `mlet data` ran,
values never seen in training land on their table's out-of-vocabulary row, and the dense
transform runs inside the graph. Scores come from ONNX Runtime in this process, or from a
KServe v2 server (`--url`). The output (CSV or Parquet) is written to a temporary file and
renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mlet.encoding import value_counts
from mlet.formats import check_columns, file_columns, first_line, is_parquet, read_batches
from mlet.raw_rows import RAW_SUFFIX, batch_columns
from mlet.repository import OpenedModel, open_model
from mlet.runtime import SessionOptions, onnxruntime_session
from mlet.transform import TRANSFORM_FILE, Transform, load_transform
from mlet.variants import ONNX_PLATFORM

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PredictConfig:
    url: str | None = None  # a KServe v2 server; None: ONNX Runtime in this process
    request_rows: int = 1024
    threads: int = 0
    timeout_s: float = 60.0
    raw: bool = False  # send the logged columns to the server's NAME-raw model instead


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


def http_scorer(url: str, model: OpenedModel, timeout_s: float) -> Scorer:
    """Scores through the Open Inference Protocol's JSON infer call."""
    endpoint = f"{url.rstrip('/')}/v2/models/{model.name}/infer"
    spec = model.manifest.spec

    def score(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        arrays = spec.model_inputs(dense, sparse)
        body = {
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(arrays[t.name].shape),
                 "data": arrays[t.name].ravel().tolist()}
                for t in spec.inputs
            ]
        }  # fmt: skip
        headers = {"Content-Type": "application/json"}
        return post_json_answer(endpoint, orjson.dumps(body), headers, timeout_s)

    return score


def post_json_answer(endpoint: str, body: bytes, headers: dict, timeout_s: float) -> np.ndarray:
    """The first output of a KServe v2 infer call answered in JSON."""
    request = urllib.request.Request(endpoint, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = orjson.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{endpoint}: HTTP {e.code}: {e.read().decode()[:500]}") from e
    except urllib.error.URLError as e:
        raise RuntimeError(f"{endpoint}: {e.reason}") from e
    output = answer["outputs"][0]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def raw_request_body(columns: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    """Logged columns as binary tensors: BYTES elements each a 4-byte little-endian length
    and the bytes, FP32 as they are; the probability comes back in JSON."""
    tensors, blobs = [], []
    for name, values in columns.items():
        if values.dtype == object:
            datatype = "BYTES"
            blob = b"".join(struct.pack("<I", len(v)) + v for v in values.reshape(-1))
        else:
            datatype, blob = "FP32", np.ascontiguousarray(values, np.float32).tobytes()
        tensors.append({"name": name, "datatype": datatype, "shape": list(values.shape),
                        "parameters": {"binary_data_size": len(blob)}})  # fmt: skip
        blobs.append(blob)
    header = orjson.dumps({"inputs": tensors})
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(header))}  # fmt: skip
    return header + b"".join(blobs), headers


def raw_http_scorer(url: str, model: OpenedModel, timeout_s: float):
    """Scores logged columns with the server's NAME-raw model (its transform step encodes)."""
    endpoint = f"{url.rstrip('/')}/v2/models/{model.name}{RAW_SUFFIX}/infer"

    def score(columns: dict[str, np.ndarray]) -> np.ndarray:
        return post_json_answer(endpoint, *raw_request_body(columns), timeout_s)

    return score


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
    if config.raw and not config.url:
        raise ValueError("raw rows go to a server's NAME-raw model: give --url too")
    if config.url:
        score = http_scorer(config.url, opened, config.timeout_s)
    else:
        score = onnx_scorer(opened, config.threads)
    score_raw = raw_http_scorer(config.url, opened, config.timeout_s) if config.raw else None
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
                if score_raw is None:
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
