"""Entry points that only the tests need: one variant in, one result out."""

from __future__ import annotations

import time
from pathlib import Path

from export.exporter import ExportConfig, ExportResult, export_variants
from export.graph import LoweredModel, LoweringOptions, lower_variants
from export.sources import MemoryWeights
from mlet.dlrm import DLRM
from mlet.spec import ExportSpec


def export_run(run_path: str | Path, repo: str | Path, config: ExportConfig) -> ExportResult:
    """Export every variant of config.variants; the first one's result."""
    return export_variants(run_path, repo, config).results[0]


def lower_to_onnx(
    model: DLRM,
    spec: ExportSpec,
    path: Path,
    variant: str = "fp32",
    options: LoweringOptions | None = None,
) -> LoweredModel:
    """Write `path` (and its external data file when large) for a model in memory, collapsed."""
    return lower_variants(MemoryWeights(model), spec, {variant: Path(path)}, options)[variant]


def tritonclient_inputs(inputs: dict, binary: bool = True) -> list:
    """tritonclient.http inputs for `dense` and `sparse` (binary: the client's default)."""
    import tritonclient.http as httpclient

    request = []
    for name in inputs:
        datatype = "FP32" if inputs[name].dtype == "float32" else "INT64"
        tensor = httpclient.InferInput(name, list(inputs[name].shape), datatype)
        tensor.set_data_from_numpy(inputs[name], binary_data=binary)
        request.append(tensor)
    return request


def grpc_inputs(inputs: dict) -> list:
    """tritonclient.grpc inputs (raw_input_contents, the client's only way to send tensors)."""
    import tritonclient.grpc as grpcclient

    request = []
    for name, array in inputs.items():
        datatype = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}[str(array.dtype)]
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        request.append(tensor)
    return request


def wait_for(predicate, timeout=20.0) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")
