"""The Open Inference Protocol (KServe v2) request and response bodies.

JSON tensors carry their values in "data". The binary tensor extension, as Triton
implements it, puts the JSON header first and the raw little-endian bytes of each
binary tensor after it, in order: the header's length travels in the
`Inference-Header-Content-Length` HTTP header, a binary input says its byte count in
its `binary_data_size` parameter, and an output is returned binary when the request
asks for it (`binary_data` on the output, or `binary_data_output` for all outputs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import orjson

from mlet.infer_request import little_endian_bytes
from mlet.spec import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"


class InferenceError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None) -> None:
        # A message may quote what the client sent, a lone surrogate included (JSON's
        # escapes spell one): written as its escape, it stays text that every answer holds.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}


@dataclass
class RequestTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferRequest:
    id: str | None
    parameters: dict
    inputs: list[RequestTensor]
    outputs: list[dict] | None = None
    binary_outputs: set[str] = field(default_factory=set)


def _field(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise InferenceError(f"{where}: missing '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InferenceError(f"{where}: '{key}' must be a {kind.__name__}")
    return value


def _parameters(obj: dict, where: str) -> dict:
    """An object's optional 'parameters', which must be a JSON object when present."""
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InferenceError(f"{where}: 'parameters' must be an object")
    return parameters


def _shape(tensor: dict, where: str) -> tuple[int, ...]:
    shape = _field(tensor, "shape", list, where)
    for d in shape:  # a loop, not all(): a raw row has dozens of 2-long shapes
        if type(d) is not int or d < 0:  # type(), not isinstance(): True is no dimension
            raise InferenceError(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(shape)


def _json_array(values, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Values from JSON (flat or nested lists) as an array of `datatype`, strictly typed."""
    if datatype == "BYTES":
        return _json_strings(values, shape, where)
    try:
        array = np.asarray(values)
    except ValueError as e:
        raise InferenceError(f"{where}: 'data' is not a rectangular array of numbers") from e
    if array.size != math.prod(shape):
        raise InferenceError(
            f"{where}: 'data' holds {array.size} values but shape {list(shape)} "
            f"needs {math.prod(shape)}"
        )
    kind = np.dtype(DATATYPES[datatype]).kind
    # Booleans are not numbers here: Triton refuses true/false for numeric datatypes too.
    allowed = {"f": "iuf", "i": "iu", "u": "u"}[kind]
    if array.size and array.dtype.kind not in allowed:
        expected = "integers" if kind in "iu" else "numbers"
        raise InferenceError(f"{where}: 'data' must hold {expected} for datatype {datatype}")
    return array.astype(DATATYPES[datatype], copy=False).reshape(shape)


def _json_strings(values, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A BYTES tensor from JSON: (nested lists of) strings, as UTF-8 bytes elements."""
    single = _single_value(values, len(shape))
    if type(single) is str and math.prod(shape) == 1:  # a raw row's column: one value
        return bytes_array(_utf8([single], f"{where}: 'data'"), shape)
    flat = _flattened(values, len(shape), where)
    if len(flat) != math.prod(shape):
        raise InferenceError(
            f"{where}: 'data' holds {len(flat)} values but shape {list(shape)} "
            f"needs {math.prod(shape)}"
        )
    if not all(isinstance(v, str) for v in flat):
        raise InferenceError(f"{where}: 'data' must hold strings for datatype BYTES")
    return bytes_array(_utf8(flat, f"{where}: 'data'"), shape)


def _utf8(strings: list[str], what: str) -> list[bytes]:
    """The strings as UTF-8; JSON's escapes can spell a lone surrogate, which has none."""
    try:
        return [v.encode() for v in strings]
    except UnicodeEncodeError as e:
        raise InferenceError(f"{what} holds a string that is not Unicode text ({e.reason})") from e


def _single_value(values, depth: int):
    """The value of data [v], or [[v]] for a tensor of 2 dimensions or more, else None
    (for the general path)."""
    if type(values) is list and len(values) == 1:
        value = values[0]
        if type(value) is list and depth > 1:
            return value[0] if len(value) == 1 else None
        return value
    return None


def _flattened(values, depth: int, where: str) -> list:
    """`values` flattened, whether the client sent them flat or nested `depth` deep."""
    if not isinstance(values, list):
        raise InferenceError(f"{where}: 'data' must be a list")
    while values and all(isinstance(v, list) for v in values) and depth > 1:
        values = [item for row in values for item in row]
        depth -= 1
    return values


def bytes_array(elements: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


def binary_bytes(raw: memoryview, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    count, offset, elements = math.prod(shape), 0, []
    for i in range(count):
        if offset + 4 > len(raw):
            raise InferenceError(
                f"{where}: binary data ends inside the length of element {i} of {count}"
            )
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InferenceError(
                f"{where}: element {i} says {length} bytes but only {len(raw) - offset} remain"
            )
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    if offset != len(raw):
        raise InferenceError(
            f"{where}: {len(raw) - offset} bytes of binary data follow its {count} elements"
        )
    return bytes_array(elements, shape)


def binary_array(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Raw little-endian bytes (a binary tensor, or a gRPC raw input) read in place."""
    if datatype == "BYTES":
        return binary_bytes(raw, shape, where)
    itemsize = np.dtype(DATATYPES[datatype]).itemsize
    if len(raw) != math.prod(shape) * itemsize:
        raise InferenceError(
            f"{where}: binary data holds {len(raw)} bytes but shape {list(shape)} of "
            f"{datatype} needs {math.prod(shape) * itemsize}"
        )
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def parse_json(text: bytes):
    """JSON, with the NaN and Infinity tokens that tritonclient writes for such floats (a
    raw row's missing number is NaN) and Triton reads; orjson, the fast path, has neither."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise InferenceError(f"request body is not valid JSON: {e}") from e


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse a JSON or binary-extension request body into typed arrays."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise InferenceError(
            f"{HEADER_LENGTH} is {header_length} but the body holds {len(body)} bytes"
        )
    header_bytes = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(header_bytes) :]
    header = parse_json(header_bytes)
    if not isinstance(header, dict):
        raise InferenceError("request body must be a JSON object")
    parameters = _parameters(header, "request")

    inputs, offset = [], 0
    for i, tensor in enumerate(_field(header, "inputs", list, "request")):
        one = one_value_tensor(tensor)
        if one is None:
            one, offset = read_tensor(tensor, i, binary, offset)
        inputs.append(one)
    if offset != len(binary):
        raise InferenceError(f"{len(binary) - offset} bytes of binary data belong to no input")

    outputs = header.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise InferenceError("'outputs' must be a list of objects with a 'name'")
    binary_outputs = set()
    for i, output in enumerate(outputs or []):
        if not isinstance(output, dict):
            raise InferenceError(f"outputs[{i}] must be an object")
        name = _field(output, "name", str, f"outputs[{i}]")
        if _parameters(output, f"output '{name}'").get("binary_data", False):
            binary_outputs.add(name)
    request_id = header.get("id")
    if request_id is not None:
        request_id = str(request_id)
        _utf8([request_id], "request 'id'")  # the answer repeats it: it must be text
    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
    )


def read_tensor(tensor, i: int, binary: memoryview, offset: int) -> tuple[RequestTensor, int]:
    """Input `i` of a request, its data in JSON or at `offset` of the binary part; the
    binary part's offset after it."""
    if not isinstance(tensor, dict):
        raise InferenceError(f"inputs[{i}] must be an object")
    name = _field(tensor, "name", str, f"inputs[{i}]")
    where = f"input '{name}'"
    datatype = _field(tensor, "datatype", str, where)
    if datatype not in DATATYPES:
        raise InferenceError(f"{where}: unsupported datatype {datatype!r}")
    shape = _shape(tensor, where)
    size = _parameters(tensor, where).get("binary_data_size")
    if size is not None:
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or offset + size > len(binary)
        ):
            raise InferenceError(f"{where}: binary_data_size {size!r} exceeds the body")
        data = binary_array(binary[offset : offset + size], datatype, shape, where)
        offset += size
    elif "data" in tensor:
        data = _json_array(tensor["data"], datatype, shape, where)
    else:
        raise InferenceError(f"{where}: neither 'data' nor a binary_data_size parameter")
    return RequestTensor(name, datatype, shape, data), offset


ONE_VALUE_KEYS = ("name", "datatype", "shape", "data")


def one_value_tensor(tensor) -> RequestTensor | None:
    """A JSON input of exactly one FP32 number or one BYTES string, shape [1, 1], read
    without read_tensor's checks (a raw row sends one per logged column); None for any other
    input, which read_tensor reads and, where it is wrong, refuses."""
    if type(tensor) is not dict or len(tensor) != len(ONE_VALUE_KEYS):
        return None
    # With those four keys, and no other: a missing one reads None and fails its check.
    shape, data = tensor.get("shape"), tensor.get("data")
    # type() checks, as _shape's: True == 1 in Python, but true is no dimension
    if type(shape) is not list or shape != [1, 1] or any(type(d) is not int for d in shape):
        return None
    value = _single_value(data, 2)
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if type(name) is not str:
        return None
    if datatype == "FP32" and type(value) is float:
        array = np.array([[value]], np.float32)
    elif datatype == "BYTES" and type(value) is str:
        try:
            element = value.encode()
        except UnicodeEncodeError:  # a lone surrogate: read_tensor names it
            return None
        # not bytes_array: its reshape, once per column, cost a Criteo raw row about 10 us
        array = np.empty((1, 1), dtype=object)
        array[0, 0] = element
    else:
        return None
    return RequestTensor(name, datatype, (1, 1), array)


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, tuple[str, np.ndarray]],
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers for `outputs` (name -> (datatype, array))."""
    all_binary = bool(request.parameters.get("binary_data_output", False))
    tensors, blobs = [], []
    for name, (datatype, array) in outputs.items():
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if all_binary or name in request.binary_outputs:
            blob = little_endian_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = np.ascontiguousarray(array).ravel()
        tensors.append(tensor)
    response = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + b"".join(blobs), headers
