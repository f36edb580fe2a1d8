"""The transform step of a raw-row ensemble, as a Triton Python-backend model.

Export copies this file into `<model>-transform/1/model.py`, beside the model's
transform.json and vocabularies. Triton's `python` backend runs it: each request's logged
columns become `dense` and `sparse` through mlet.raw_rows, the code `mlet predict` runs,
and the ensemble hands them to the model. A bad value answers that request alone with an
error naming the column and row.

The stub needs numpy, pyarrow and this project on its path: `mlet serve --engine triton`
names them in MLET_TRITON_PYTHONPATH; another Triton installs the project in the Python
environment its Python backend runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The stub runs an isolated interpreter, which ignores PYTHONPATH (see triton_onnxruntime).
sys.path[:0] = [p for p in os.environ.get("MLET_TRITON_PYTHONPATH", "").split(":") if p]

import triton_python_backend_utils as pb_utils  # noqa: E402

from mlet.raw_rows import raw_column_names, raw_to_inputs  # noqa: E402
from mlet.transform import load_transform  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.transform = load_transform(Path(args["model_repository"]) / args["model_version"])
        self.columns = list(raw_column_names(self.transform.fmt))
        outputs = {t["name"]: t for t in config["output"]}
        self.with_dense = "dense" in outputs
        self.sparse_dtype = pb_utils.triton_string_to_numpy(outputs["sparse"]["data_type"])

    def execute(self, requests: list) -> list:
        return [self.transform_request(request) for request in requests]

    def transform_request(self, request):
        try:
            columns = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.columns
            }
            dense, sparse = raw_to_inputs(self.transform, columns, self.sparse_dtype)
        except ValueError as e:  # DataFormatError names the column and the row
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        tensors = [pb_utils.Tensor("sparse", sparse)]
        if self.with_dense:
            tensors.insert(0, pb_utils.Tensor("dense", dense))
        return pb_utils.InferenceResponse(output_tensors=tensors)
