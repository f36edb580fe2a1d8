"""Request bodies drawn like the data: skewed ids, realistic counts, in JSON or binary form."""

from __future__ import annotations

import numpy as np
import orjson

from mlet.spec import ExportSpec
from mlet.zipf import ZipfSampler

HEADER_LENGTH = "Inference-Header-Content-Length"


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
        dense = np.floor(
            np.expm1(np.maximum(self.rng.normal(2.0, 1.0, (rows, self.spec.num_dense)), 0))
        )
        extra = sparse_spec.shape[1:]
        sparse = np.stack([s.sample((rows, *extra), self.rng) for s in self.samplers], axis=1)
        return self.spec.model_inputs(dense.astype(np.float32), sparse.astype(sparse_spec.dtype))

    def body(self, rows: int, binary: bool) -> tuple[bytes, dict[str, str]]:
        """An infer request body and its headers; binary uses the binary tensor extension."""
        return encode_inputs(self.spec, self.inputs(rows), binary)


def encode_inputs(
    spec: ExportSpec, inputs: dict[str, np.ndarray], binary: bool
) -> tuple[bytes, dict[str, str]]:
    tensors, blobs = [], []
    for tensor in spec.inputs:
        array = np.ascontiguousarray(inputs[tensor.name], dtype=tensor.dtype)
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel()
        tensors.append(entry)
    request = {"inputs": tensors}
    if binary:
        request["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
    headers = {"Content-Type": "application/json"}
    if binary:
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + b"".join(blobs), headers
