"""KServe v2 infer requests as the wire carries them: JSON, the binary tensor extension, gRPC.

Every client in the project encodes its requests here: the load tests (wrk, h2load and
Locust bodies, the checks around a load) and `mlet predict --url`. A request is a list of
`InputTensor`s, each with its KServe v2 datatype:

- numeric tensors (FP32, FP16, INT64, INT32) travel as their values in JSON "data", or as
  their little-endian bytes (a binary tensor, a gRPC raw input);
- BYTES tensors (the raw-row models' categorical columns) travel as strings in JSON "data"
  (UTF-8: other bytes cannot go in JSON), or as each element's length in 4 little-endian
  bytes followed by the element (Triton's serialize_byte_tensor format), in a binary tensor
  and in gRPC's raw_input_contents alike.

Standard JSON has no NaN or infinity; a raw row's missing number is NaN, so a body holding
one is written with the `NaN` / `Infinity` tokens, as tritonclient writes them and both
engines read them (orjson, the fast path, would write null).
A gRPC message is sent by grpcio as it is; for a load generator that posts one fixed HTTP/2
body (h2load), `grpc_frame` gives the message as gRPC frames it: 1 byte 0 (uncompressed),
4 bytes big-endian length, then the message.

The protobuf classes (tritonclient.grpc's compiled grpc_service.proto) are imported only by
the gRPC functions, so an HTTP client does not pay for them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

from mlet.spec import DATATYPES, ExportSpec

if TYPE_CHECKING:
    from tritonclient.grpc import service_pb2

BYTES = "BYTES"
HEADER_LENGTH = "Inference-Header-Content-Length"
GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"  # the HTTP/2 path of the RPC
GRPC_MESSAGE_BYTES = 64 << 20  # the largest message a channel sends or receives
NUMERIC = {name: np.dtype(dtype) for name, dtype in DATATYPES.items() if name != BYTES}


@dataclass(frozen=True)
class InputTensor:
    """One input of a request: `array` has the datatype's dtype (numeric) or holds one
    bytes or str object per element (BYTES)."""

    name: str
    datatype: str
    array: np.ndarray


def datatype_of(name: str, array: np.ndarray) -> str:
    """The KServe v2 datatype of an array: object, bytes and str arrays are BYTES."""
    if array.dtype.kind in "OSU":
        return BYTES
    for datatype, dtype in NUMERIC.items():
        if array.dtype == dtype:
            return datatype
    raise ValueError(
        f"input {name!r}: no KServe v2 datatype for {array.dtype} (use float32, float16, "
        "int64, int32, or an object array of bytes for BYTES)"
    )


def input_tensor(name: str, values: np.ndarray, datatype: str | None = None) -> InputTensor:
    """`values` as an input of `datatype` (default: from its dtype), cast where numeric."""
    array = np.asarray(values)
    datatype = datatype or datatype_of(name, array)
    if datatype == BYTES:
        return InputTensor(name, BYTES, array.astype(object, copy=False))
    if datatype not in NUMERIC:
        raise ValueError(f"input {name!r}: datatype {datatype!r} is not one of {[*NUMERIC, BYTES]}")
    return InputTensor(name, datatype, np.ascontiguousarray(array, dtype=NUMERIC[datatype]))


def spec_tensors(spec: ExportSpec, inputs: dict[str, np.ndarray]) -> list[InputTensor]:
    """A model's inputs in its spec's order, each cast to its declared datatype."""
    return [input_tensor(t.name, inputs[t.name], t.datatype) for t in spec.inputs]


def column_tensors(columns: dict[str, np.ndarray]) -> list[InputTensor]:
    """A raw-row model's inputs: object columns BYTES, numeric ones FP32 (NaN: missing)."""
    return [
        input_tensor(name, values, BYTES if values.dtype.kind in "OSU" else "FP32")
        for name, values in columns.items()
    ]


# -- the bytes of a tensor -----------------------------------------------------------------


def element_bytes(name: str, index: int, value) -> bytes:
    """One BYTES element as bytes: bytes as they are, str as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(
        f"input {name!r}: BYTES element {index} is a {type(value).__name__}, not bytes or str"
    )


def serialize_bytes(name: str, array: np.ndarray) -> bytes:
    """A BYTES tensor in C order, each element a 4-byte little-endian length and its bytes."""
    parts = []
    for index, value in enumerate(array.reshape(-1)):
        element = element_bytes(name, index, value)
        parts += [len(element).to_bytes(4, "little"), element]
    return b"".join(parts)


def little_endian_bytes(array: np.ndarray) -> bytes:
    """A numeric tensor as the wire carries it: contiguous, little-endian (binary HTTP,
    gRPC raw inputs and outputs)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def tensor_bytes(tensor: InputTensor) -> bytes:
    """A tensor as binary HTTP and gRPC raw inputs carry it."""
    if tensor.datatype == BYTES:
        return serialize_bytes(tensor.name, tensor.array)
    return little_endian_bytes(tensor.array)


def json_data(tensor: InputTensor) -> np.ndarray | list[str]:
    """A tensor's flat values for JSON "data": numbers, or BYTES elements as text."""
    if tensor.datatype != BYTES:
        return tensor.array.reshape(-1)
    texts = []
    for index, value in enumerate(tensor.array.reshape(-1)):
        element = element_bytes(tensor.name, index, value)
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(
                f"input {tensor.name!r}: BYTES element {index} ({element[:16]!r}) is not UTF-8, "
                "so it cannot go in a JSON body: send binary tensors (or gRPC)"
            ) from None
    return texts


def finite(tensor: InputTensor) -> bool:
    return tensor.array.dtype.kind != "f" or bool(np.isfinite(tensor.array).all())


def json_bytes(request: dict, tokens: bool) -> bytes:
    """A request header as JSON; `tokens`: with NaN / Infinity tokens for such floats."""
    if not tokens:
        return orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(request, separators=(",", ":"), default=np.ndarray.tolist).encode()


# -- HTTP ----------------------------------------------------------------------------------


def http_body(
    tensors: list[InputTensor], binary: bool, binary_output: bool = False
) -> tuple[bytes, dict[str, str]]:
    """An infer request body and its headers: JSON, or (binary) a JSON header followed by
    each tensor's bytes, the binary tensor extension. `binary_output` asks for binary
    outputs (only with `binary`)."""
    entries, blobs = [], []
    for tensor in tensors:
        entry = {"name": tensor.name, "datatype": tensor.datatype,
                 "shape": list(tensor.array.shape)}  # fmt: skip
        if binary:
            blob = tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(tensor)
        entries.append(entry)
    request: dict = {"inputs": entries}
    if binary and binary_output:
        request["parameters"] = {"binary_data_output": True}
    header = json_bytes(request, tokens=not binary and not all(map(finite, tensors)))
    if not binary:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + b"".join(blobs), headers


def http_infer(
    url: str, model: str, body: bytes, headers: dict, timeout_s: float, what: str = "infer"
) -> bytes:
    """One HTTP infer request's answer; a refusal raises with the model and the server's words."""
    import urllib.error
    import urllib.request

    endpoint = f"{url.rstrip('/')}/v2/models/{model}/infer"
    request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        reply = e.read()[:500].decode(errors="replace")
        raise RuntimeError(
            f"{what} request to model {model!r} at {endpoint} failed: HTTP {e.code}: {reply}"
        ) from e
    except urllib.error.URLError as e:
        raise RuntimeError(
            f"{what} request to model {model!r} at {endpoint} failed: {e.reason}"
        ) from e


def json_output(answer: bytes, name: str, where: str) -> np.ndarray:
    """Output `name` of an infer answer in JSON, shaped as answered."""
    outputs = {o.get("name"): o for o in orjson.loads(answer).get("outputs", [])}
    if name not in outputs:
        raise RuntimeError(f"{where}: the answer has no output {name!r} (got {list(outputs)})")
    output = outputs[name]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


# -- gRPC ----------------------------------------------------------------------------------


def grpc_request(
    model: str, tensors: list[InputTensor], outputs: tuple[str, ...] = (), version: str = ""
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with every tensor in raw_input_contents (as tritonclient sends
    them); `outputs` names the outputs wanted (none: all)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for tensor in tensors:
        entry = request.inputs.add()
        entry.name, entry.datatype = tensor.name, tensor.datatype
        entry.shape.extend(tensor.array.shape)
        request.raw_input_contents.append(tensor_bytes(tensor))
    for name in outputs:
        request.outputs.add().name = name
    return request


def grpc_frame(message: bytes) -> bytes:
    """A serialized message as one gRPC length-prefixed frame: flag 0 (not compressed),
    4-byte big-endian length, the message. The body h2load posts to ModelInfer."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_output(response: service_pb2.ModelInferResponse, name: str) -> np.ndarray:
    """Numeric output `name` of a ModelInferResponse, raw or in typed contents."""
    names = [o.name for o in response.outputs]
    if name not in names:
        raise RuntimeError(f"{response.model_name}: the answer has no output {name!r} ({names})")
    index = names.index(name)
    output = response.outputs[index]
    dtype = NUMERIC.get(output.datatype)
    if dtype is None:
        raise RuntimeError(f"{response.model_name}: output {name!r} is {output.datatype}")
    shape = tuple(output.shape)
    if index < len(response.raw_output_contents):
        raw = response.raw_output_contents[index]
        return np.frombuffer(raw, dtype.newbyteorder("<")).reshape(shape)
    contents = output.contents
    values = {"f": contents.fp32_contents, "i": contents.int64_contents or contents.int_contents}
    array = np.asarray(values.get(dtype.kind, []), dtype)
    if array.size != math.prod(shape):
        raise RuntimeError(f"{response.model_name}: output {name!r} has no values")
    return array.reshape(shape)


def grpc_address(url: str) -> str:
    """host:port of a gRPC endpoint given as host:port or grpc:// (or http://) URL."""
    address = url.split("://", 1)[-1].rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"gRPC endpoint {url!r}: give host:port, e.g. 127.0.0.1:8001")
    return address


@contextmanager
def grpc_stub(url: str) -> Iterator:
    """A GRPCInferenceService stub on an insecure channel, closed on exit."""
    import grpc
    from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

    options = [("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES)]  # fmt: skip
    with grpc.insecure_channel(grpc_address(url), options=options) as channel:
        yield GRPCInferenceServiceStub(channel)


def grpc_infer(
    stub, request: service_pb2.ModelInferRequest, timeout_s: float
) -> service_pb2.ModelInferResponse:
    """One ModelInfer call; a refusal raises with the model, the status and the server's words."""
    import grpc

    try:
        return stub.ModelInfer(request, timeout=timeout_s)
    except grpc.RpcError as e:
        raise RuntimeError(
            f"model {request.model_name!r}: gRPC {e.code().name}: {e.details()}"
        ) from e
