"""A Python-based Triton backend named `onnxruntime`: runs a model folder's model.onnx.

Triton loads this file as `<backend-directory>/onnxruntime/model.py` (its documented
"Python-based backends" mechanism) where the native C++ onnxruntime backend is missing, as
in the nvidia-pytriton wheel. A repository exported with `platform: "onnxruntime_onnx"`
then loads unmodified. It is not Triton's native backend: every batch crosses into a
Python stub process through shared memory. Production images ship the native one.

Like the native backend it runs one ONNX Runtime call per batch Triton's dynamic batcher
formed, with the session built by the project's one session factory (mlet.runtime). It imports
neither torch nor the server, so it runs in Triton's own Python environment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The Python backend's stub starts an isolated interpreter, which ignores PYTHONPATH: the
# launcher names the folders holding numpy, onnxruntime and the project in this variable.
sys.path[:0] = [p for p in os.environ.get("MLET_TRITON_PYTHONPATH", "").split(":") if p]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mlet.runtime import SessionOptions, onnxruntime_session  # noqa: E402

BACKEND_NAME = "mlet Python-based onnxruntime backend"
SESSION_OPTIONS_ENV = "MLET_SESSION_OPTIONS"  # JSON of SessionOptions fields, set by the launcher
TABLE_ROWS_PARAMETER = "sparse.table_rows"


def session_options() -> SessionOptions:
    fields = json.loads(os.environ.get(SESSION_OPTIONS_ENV) or "{}")
    if "providers" in fields:
        fields["providers"] = tuple(fields["providers"])
    return SessionOptions(**fields)


def table_rows(config: dict) -> np.ndarray | None:
    """The valid id range of each sparse column, from the config's parameters."""
    value = config.get("parameters", {}).get(TABLE_ROWS_PARAMETER, {}).get("string_value")
    return None if not value else np.array([int(v) for v in value.split(",")], dtype=np.int64)


def ids_out_of_range(sparse: np.ndarray, rows: np.ndarray | None) -> str | None:
    """Why a request's ids cannot be looked up, or None: one bad request must not fail a batch."""
    if rows is None or sparse.ndim < 2 or sparse.shape[1] != rows.size:
        return None
    limits = rows.reshape(1, -1, *([1] * (sparse.ndim - 2)))
    bad = (sparse < 0) | (sparse >= limits)
    if not bad.any():
        return None
    where = tuple(np.argwhere(bad)[0])
    row, column = where[:2]
    limit = rows[column]
    return f"input 'sparse' row {row} column {column}: id {sparse[where]} is outside [0, {limit})"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        path = folder / (config.get("default_model_filename") or "model.onnx")
        instances = sum(g.get("count", 1) for g in config.get("instance_group", [])) or 1
        options = session_options()
        self.session = onnxruntime_session(path, options, instances)
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.table_rows = table_rows(config)
        import onnxruntime

        pb_utils.Logger.log_info(
            f"{BACKEND_NAME} (ONNX Runtime {onnxruntime.__version__}, not Triton's native "
            f"C++ backend) serves {args['model_name']} version {args['model_version']} "
            f"from {path} with {options}"
        )

    def execute(self, requests: list) -> list:
        """One ONNX Runtime call for the whole batch; each request gets its own rows back."""
        responses: list = [None] * len(requests)
        good, arrays = [], {name: [] for name in self.input_names}
        for i, request in enumerate(requests):
            inputs = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            }
            error = ids_out_of_range(inputs.get("sparse", np.empty(0)), self.table_rows)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
                continue
            good.append(i)
            for name, value in inputs.items():
                arrays[name].append(value)
        if not good:
            return responses
        rows = [arrays[self.input_names[0]][k].shape[0] for k in range(len(good))]
        try:
            merged = {name: np.concatenate(parts) for name, parts in arrays.items()}
            outputs = dict(
                zip(self.output_names, self.session.run(self.output_names, merged), strict=True)
            )
        except Exception as e:  # the batch fails; Triton answers each of its requests
            for i in good:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"ONNX Runtime failed: {e}")
                )
            return responses
        bounds = np.cumsum(rows)[:-1]
        split = {name: np.split(outputs[name], bounds) for name in self.output_names}
        for k, i in enumerate(good):
            tensors = [pb_utils.Tensor(name, split[name][k]) for name in self.output_names]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.session = None
