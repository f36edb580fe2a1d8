"""mlet.infer_request: one encoder of KServe v2 requests for JSON, binary and gRPC, BYTES
included, checked against tritonclient's own serialization and parsers."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from bench.load.request_bodies import RequestFactory, encode_inputs
from mlet.infer_request import (
    HEADER_LENGTH,
    column_tensors,
    grpc_address,
    grpc_frame,
    grpc_output,
    grpc_request,
    http_body,
    input_tensor,
    serialize_bytes,
    spec_tensors,
)
from mlet.spec import ExportSpec, TensorSpec

SPEC = ExportSpec(
    inputs=(TensorSpec("dense", "FP32", (2,)), TensorSpec("sparse", "INT64", (3,))),
    outputs=(TensorSpec("probability", "FP32", (1,)),),
    table_rows=(5, 6, 7),
    table_names=("a", "b", "c"),
)
COLUMNS = {
    "price": np.array([[1.5], [np.nan]], np.float32),
    "user": np.array([[b"u1"], ["é-ü"]], dtype=object),
    "empty": np.array([[b""], [b"x" * 300]], dtype=object),
}


def triton_serialized(values: np.ndarray) -> bytes:
    """tritonclient's serialize_byte_tensor (a 0-d object array holding the bytes)."""
    return serialize_byte_tensor(values).item() if values.size else b""


def split_binary(body: bytes, headers: dict) -> tuple[dict, bytes]:
    length = int(headers[HEADER_LENGTH])
    return orjson.loads(body[:length]), body[length:]


def test_bytes_serialize_as_tritonclient_does():
    for values in COLUMNS["user"], COLUMNS["empty"], np.array([], dtype=object):
        assert serialize_bytes("user", values) == triton_serialized(values)
        if values.size:
            decoded = deserialize_bytes_tensor(serialize_bytes("user", values))
            assert [bytes(v) for v in decoded] == [
                v if isinstance(v, bytes) else v.encode() for v in values.ravel()
            ]


def test_json_body_carries_bytes_as_text_and_numbers_as_numbers():
    columns = {"user": COLUMNS["user"], "n": np.array([[3.0], [4.0]], np.float32)}
    body, headers = http_body(column_tensors(columns), binary=False)
    assert headers == {"Content-Type": "application/json"}
    request = orjson.loads(body)
    assert request == {"inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [2, 1], "data": ["u1", "é-ü"]},
        {"name": "n", "datatype": "FP32", "shape": [2, 1], "data": [3.0, 4.0]},
    ]}  # fmt: skip


def test_binary_body_carries_each_tensor_after_the_json_header():
    body, headers = http_body(column_tensors(COLUMNS), binary=True)
    header, blobs = split_binary(body, headers)
    sizes = [t["parameters"]["binary_data_size"] for t in header["inputs"]]
    assert [t["datatype"] for t in header["inputs"]] == ["FP32", "BYTES", "BYTES"]
    assert "parameters" not in header  # the answer comes back in JSON
    assert len(blobs) == sum(sizes)
    price = np.frombuffer(blobs[: sizes[0]], "<f4")
    assert price[0] == 1.5 and np.isnan(price[1])
    user = deserialize_bytes_tensor(blobs[sizes[0] : sizes[0] + sizes[1]])
    assert [bytes(v) for v in user] == [b"u1", "é-ü".encode()]


def test_bytes_that_are_not_utf8_cannot_go_in_json_but_go_binary():
    columns = {"user": np.array([[b"ok"], [b"\xff\xfe"]], dtype=object)}
    with pytest.raises(ValueError, match=r"input 'user': BYTES element 1 .* is not UTF-8"):
        http_body(column_tensors(columns), binary=False)
    body, headers = http_body(column_tensors(columns), binary=True)
    assert split_binary(body, headers)[1].endswith(b"\x02\x00\x00\x00\xff\xfe")


def test_json_writes_nan_and_infinity_as_tritonclient_does():
    columns = {"price": np.array([[1.5], [np.nan], [-np.inf]], np.float32),
               "user": np.array([["ü"], ["b"], ["c"]], dtype=object)}  # fmt: skip
    body, _ = http_body(column_tensors(columns), binary=False)
    assert b'"data":[1.5,NaN,-Infinity]' in body
    data = json.loads(body)["inputs"][1]["data"]
    assert data == ["ü", "b", "c"]


def test_bad_elements_and_dtypes_are_named():
    with pytest.raises(ValueError, match="input 'c': BYTES element 1 is a int"):
        serialize_bytes("c", np.array([b"a", 3], dtype=object))
    with pytest.raises(ValueError, match="input 'x': no KServe v2 datatype for bool"):
        input_tensor("x", np.array([True]))
    with pytest.raises(ValueError, match="input 'x': datatype 'UINT8' is not one of"):
        input_tensor("x", np.array([1]), "UINT8")


def test_the_load_tests_bodies_are_the_encoders():
    """bench's encode_inputs keeps its contract: spec order, spec dtypes, binary outputs."""
    inputs = SPEC.random_inputs(3, np.random.default_rng(0))
    inputs = {"sparse": inputs["sparse"].astype(np.int32), "dense": inputs["dense"]}
    body, headers = encode_inputs(SPEC, inputs, binary=True)
    header, blobs = split_binary(body, headers)
    assert [t["name"] for t in header["inputs"]] == ["dense", "sparse"]
    assert header["parameters"] == {"binary_data_output": True}
    np.testing.assert_array_equal(np.frombuffer(blobs[24:], "<i8").reshape(3, 3),
                                  inputs["sparse"])  # fmt: skip
    body, _ = encode_inputs(SPEC, inputs, binary=False)
    assert orjson.loads(body)["inputs"][1]["data"] == inputs["sparse"].ravel().tolist()


def test_the_grpc_request_is_the_one_tritonclient_builds():
    arrays = RequestFactory(SPEC, seed=3).inputs(4)
    mine = grpc_request("m", spec_tensors(SPEC, arrays), outputs=("probability",))
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(
            name, list(array.shape), "FP32" if name == "dense" else "INT64"
        )
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput("probability")]
    theirs = grpcclient._utils._get_inference_request(
        "m", inputs, "", "", outputs, 0, False, False, 0, None, None
    )
    assert mine == theirs


def test_grpc_bytes_go_in_raw_input_contents_serialized_the_same_way():
    request = grpc_request("m-raw", column_tensors(COLUMNS))
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("price", "FP32", [2, 1]), ("user", "BYTES", [2, 1]), ("empty", "BYTES", [2, 1])
    ]  # fmt: skip
    assert request.raw_input_contents[1] == triton_serialized(COLUMNS["user"])


def test_the_grpc_frame_h2load_posts():
    message = grpc_request("m", spec_tensors(SPEC, SPEC.random_inputs(1, np.random.default_rng(0))))
    payload = message.SerializeToString()
    frame = grpc_frame(payload)
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(payload)
    assert service_pb2.ModelInferRequest.FromString(frame[5:]) == message


def test_grpc_outputs_raw_or_typed():
    response = service_pb2.ModelInferResponse(model_name="m")
    output = response.outputs.add(name="probability", datatype="FP32", shape=[2, 1])
    response.raw_output_contents.append(np.array([0.25, 0.5], "<f4").tobytes())
    np.testing.assert_array_equal(grpc_output(response, "probability"), [[0.25], [0.5]])
    del response.raw_output_contents[:]
    output.contents.fp32_contents.extend([0.75, 1.0])
    np.testing.assert_array_equal(grpc_output(response, "probability"), [[0.75], [1.0]])
    with pytest.raises(RuntimeError, match="m: the answer has no output 'logit'"):
        grpc_output(response, "logit")


@pytest.mark.parametrize(
    "url, address",
    [("127.0.0.1:8001", "127.0.0.1:8001"), ("grpc://localhost:9/", "localhost:9"),
     ("http://127.0.0.1:8001", "127.0.0.1:8001")],
)  # fmt: skip
def test_grpc_addresses(url, address):
    assert grpc_address(url) == address


def test_a_grpc_address_needs_a_port():
    with pytest.raises(ValueError, match="give host:port"):
        grpc_address("127.0.0.1")
