import json
import re

import numpy as np
import orjson
import pytest

from bench.load.request_bodies import encode_inputs
from mlet.spec import ExportSpec, TensorSpec
from serve.protocol import (
    InferenceError,
    InferRequest,
    decode_request,
    encode_response,
    one_value_tensor,
    read_tensor,
)
from serve.validation import requested_outputs, validate_inputs

SPEC = ExportSpec(
    inputs=(TensorSpec("dense", "FP32", (2,)), TensorSpec("sparse", "INT64", (3,))),
    outputs=(TensorSpec("probability", "FP32", (1,)),),
    table_rows=(10, 5, 7),
    table_names=("C1", "C2", "C3"),
    max_batch_size=4,
)


def body(dense, sparse, batch=1, **overrides) -> bytes:
    request = {
        "inputs": [
            {"name": "dense", "datatype": "FP32", "shape": [batch, 2], "data": dense},
            {"name": "sparse", "datatype": "INT64", "shape": [batch, 3], "data": sparse},
        ]
    }
    request.update(overrides)
    return orjson.dumps(request)


def test_json_request_decodes_nested_or_flat():
    nested = decode_request(body([[1, 2.5]], [[1, 2, 3]]))
    flat = decode_request(body([1, 2.5], [1, 2, 3]))
    for request in (nested, flat):
        arrays = validate_inputs(SPEC, request)
        assert arrays["dense"].dtype == np.float32 and arrays["dense"].shape == (1, 2)
        assert arrays["sparse"].dtype == np.int64 and arrays["sparse"].tolist() == [[1, 2, 3]]


@pytest.mark.parametrize("binary", [False, True])
def test_client_encoding_round_trips(binary):
    inputs = {
        "dense": np.array([[1, 2], [3, 4]], np.float32),
        "sparse": np.array([[0, 4, 6], [9, 0, 0]], np.int64),
    }
    payload, headers = encode_inputs(SPEC, inputs, binary)
    length = headers.get("Inference-Header-Content-Length")
    request = decode_request(payload, int(length) if length else None)
    arrays = validate_inputs(SPEC, request)
    for name, value in inputs.items():
        assert np.array_equal(arrays[name], value)


def test_binary_response_and_json_response():
    probability = np.array([[0.25], [0.5]], np.float32)
    request = InferRequest(id="7", parameters={"binary_data_output": True}, inputs=[])
    content, headers = encode_response("m", "1", request, {"probability": ("FP32", probability)})
    length = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(content[:length])
    assert header["id"] == "7" and header["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.array_equal(np.frombuffer(content[length:], np.float32), probability.ravel())
    content, headers = encode_response(
        "m", "1", InferRequest(None, {}, []), {"probability": ("FP32", probability)}
    )
    assert "Inference-Header-Content-Length" not in headers
    assert orjson.loads(content)["outputs"][0] == {
        "name": "probability",
        "datatype": "FP32",
        "shape": [2, 1],
        "data": [0.25, 0.5],
    }


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not json", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (orjson.dumps({"inputs": 3}), "'inputs' must be a list"),
        (body([[1, 2]], [[1, 2, 3]], parameters=[1]), "'parameters' must be an object"),
        (body([[1, 2]], [[1, 2]]), "holds 2 values but shape \\[1, 3\\] needs 3"),
        (body([[1, 2]], [[1, 2.5, 3]]), "must hold integers for datatype INT64"),
        (body([[1, "a"]], [[1, 2, 3]]), "must hold numbers"),
        (body([[1, 2], [3]], [[1, 2, 3]], batch=2), "input 'dense'"),
    ],
)
def test_malformed_requests_name_the_fault(payload, message):
    with pytest.raises(InferenceError, match=message) as error:
        validate_inputs(SPEC, decode_request(payload))
    assert error.value.status == 400


def invalid(request: dict, message: str):
    with pytest.raises(InferenceError, match=message) as error:
        validate_inputs(SPEC, decode_request(orjson.dumps(request)))
    assert error.value.status == 400


def tensor(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


DENSE = tensor("dense", "FP32", [1, 2], [1, 2])
SPARSE = tensor("sparse", "INT64", [1, 3], [1, 2, 3])


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([DENSE], "missing input\\(s\\) \\['sparse'\\]"),
        ([DENSE, SPARSE, tensor("extra", "FP32", [1], [1])], "unknown input\\(s\\) \\['extra'\\]"),
        ([DENSE, DENSE, SPARSE], "input 'dense' is given more than once"),
        ([tensor("dense", "INT64", [1, 2], [1, 2]), SPARSE], "'dense' has datatype INT64"),
        ([tensor("dense", "FP32", [1, 3], [1, 2, 3]), SPARSE], "'dense' has shape \\[1, 3\\]"),
        ([tensor("dense", "FP32", [2], [1, 2]), SPARSE], "'dense' has shape \\[2\\]"),
        ([DENSE, tensor("sparse", "INT64", [1, 3], [1, 5, 3])], "id 5 is outside table C2"),
        ([DENSE, tensor("sparse", "INT64", [1, 3], [-1, 0, 0])], "id -1 is outside table C1"),
        (
            [
                tensor("dense", "FP32", [5, 2], [1] * 10),
                tensor("sparse", "INT64", [5, 3], [0] * 15),
            ],
            "batch 5, above the model's maximum of 4",
        ),
        (
            [tensor("dense", "FP32", [2, 2], [1] * 4), SPARSE],
            "inputs disagree on the batch size",
        ),
        ([tensor("dense", "FP32", [0, 2], []), SPARSE], "empty batch"),
    ],
)
def test_invalid_inputs_name_the_input(inputs, message):
    invalid({"inputs": inputs}, message)


def test_non_finite_dense_values_are_refused():
    request = decode_request(body([[1, 2]], [[1, 2, 3]]))
    request.inputs[0].data = np.array([[1, np.nan]], np.float32)
    with pytest.raises(InferenceError, match="non-finite value at row 0, feature 1"):
        validate_inputs(SPEC, request)


def test_binary_sizes_must_match():
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "dense",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                },
                {
                    "name": "sparse",
                    "datatype": "INT64",
                    "shape": [1, 3],
                    "parameters": {"binary_data_size": 20},
                },
            ]
        }
    )
    with pytest.raises(InferenceError, match="input 'sparse': binary data holds 20 bytes"):
        decode_request(header + bytes(28), len(header))
    with pytest.raises(InferenceError, match="exceeds the body"):
        decode_request(header + bytes(10), len(header))
    with pytest.raises(InferenceError, match="Inference-Header-Content-Length is 999"):
        decode_request(header, 999)


def test_unknown_requested_output():
    request = decode_request(body([[1, 2]], [[1, 2, 3]], outputs=[{"name": "logit"}]))
    with pytest.raises(InferenceError, match="unknown output\\(s\\) \\['logit'\\]"):
        requested_outputs(SPEC, request)


GOOD_INPUTS = [
    {"name": "dense", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 1.0]},
    {"name": "sparse", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
]


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({"inputs": [{**GOOD_INPUTS[0], "parameters": 5}, GOOD_INPUTS[1]]}, "'parameters' must"),
        ({"inputs": [{**GOOD_INPUTS[0], "parameters": [1]}, GOOD_INPUTS[1]]}, "'parameters' must"),
        ({"inputs": GOOD_INPUTS, "outputs": [{"name": 7}]}, "'name' must be a str"),
        ({"inputs": GOOD_INPUTS, "outputs": [{"name": "p", "parameters": "x"}]}, "'parameters'"),
        ({"inputs": GOOD_INPUTS, "outputs": [3]}, "outputs[0] must be an object"),
        ({"inputs": GOOD_INPUTS, "outputs": {"name": "p"}}, "'outputs' must be a list"),
        ({"inputs": [{**GOOD_INPUTS[0], "data": [True, False]}, GOOD_INPUTS[1]]}, "numbers"),
        (
            {"inputs": [{**GOOD_INPUTS[0], "parameters": {"binary_data_size": True}}]},
            "binary_data_size",
        ),
    ],
)
def test_client_mistakes_are_client_errors(request_body, message):
    """Each of these was a TypeError/AttributeError (a 500) or accepted (booleans as FP32)."""
    with pytest.raises(InferenceError, match=re.escape(message)) as error:
        decode_request(orjson.dumps(request_body))
    assert error.value.status == 400


@pytest.mark.parametrize(
    ("shape", "data", "expected"),
    [
        ([1, 1], [["a8"]], [[b"a8"]]),  # a raw row's column, nested
        ([1, 1], ["a8"], [[b"a8"]]),  # and flat
        ([1], ["a8"], [b"a8"]),
        ([2, 1], [["a"], ["b"]], [[b"a"], [b"b"]]),
    ],
)
def test_json_bytes_tensors_decode_nested_or_flat(shape, data, expected):
    body = {"inputs": [{"name": "C1", "datatype": "BYTES", "shape": shape, "data": data}]}
    (tensor,) = decode_request(orjson.dumps(body)).inputs
    assert tensor.data.dtype == object and tensor.data.tolist() == expected


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ([1], [["a8"]], "must hold strings"),  # nested deeper than its shape
        ([1, 1], [[7]], "must hold strings"),
        ([1, 2], [["a"]], "holds 1 values but shape"),
    ],
)
def test_json_bytes_tensors_refuse_what_their_shape_does_not_hold(shape, data, message):
    body = {"inputs": [{"name": "C1", "datatype": "BYTES", "shape": shape, "data": data}]}
    with pytest.raises(InferenceError, match=message):
        decode_request(orjson.dumps(body))


def test_a_lone_surrogate_is_refused_where_the_answer_or_a_transform_needs_text():
    """JSON's escapes spell "\\ud800", which is no Unicode text: a 400, not a failed answer."""
    inputs = [{"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": [["\ud800"]]}]
    body = json.dumps({"inputs": inputs}).encode()
    with pytest.raises(InferenceError, match="input 'C1': 'data' holds a string that is not"):
        decode_request(body)
    inputs[0]["data"] = [["a"]]
    body = json.dumps({"id": "x\udfff", "inputs": inputs}).encode()
    with pytest.raises(InferenceError, match="request 'id' holds a string that is not Unicode"):
        decode_request(body)


def test_a_refusal_that_quotes_a_lone_surrogate_stays_text():
    error = InferenceError("input 'C\ud800': binary_data_size 9 exceeds the body")
    assert error.message == "input 'C\\ud800': binary_data_size 9 exceeds the body"
    assert orjson.dumps({"error": error.message})  # what the HTTP answer writes


ONE_VALUE_CASES = [
    # (tensor, read by the one-value path?)
    ({"name": "I1", "datatype": "FP32", "shape": [1, 1], "data": [86.0]}, True),
    ({"name": "I1", "datatype": "FP32", "shape": [1, 1], "data": [[-0.5]]}, True),
    ({"name": "I1", "datatype": "FP32", "shape": [1, 1], "data": [float("nan")]}, True),
    ({"name": "I1", "datatype": "FP32", "shape": [1, 1], "data": [1e300]}, True),
    ({"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": ["68fd1e64"]}, True),
    ({"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": [[""]]}, True),
    ({"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": ["é\u00ff"]}, True),
    ({"name": "I1", "datatype": "FP32", "shape": [1, 1], "data": [3]}, False),  # an int
    ({"name": "I1", "datatype": "FP32", "shape": [1, 1], "data": [True]}, False),
    ({"name": "I1", "datatype": "FP32", "shape": [True, 1], "data": [1.0]}, False),
    ({"name": "I1", "datatype": "FP32", "shape": [1], "data": [1.0]}, False),
    ({"name": "I1", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}, False),
    ({"name": "I1", "datatype": "FP64", "shape": [1, 1], "data": [1.0]}, False),
    ({"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": [5]}, False),
    ({"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": ["\ud800"]}, False),
    ({"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": [["a", "b"]]}, False),
    ({"name": 7, "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}, False),
    (
        {"name": "C1", "datatype": "BYTES", "shape": [1, 1], "data": ["a"], "parameters": {}},
        False,
    ),
]


@pytest.mark.parametrize(("tensor", "fast"), ONE_VALUE_CASES)
def test_one_value_inputs_decode_as_the_general_path_does(tensor, fast):
    """A raw row's one-value columns skip the general checks: what that path reads must
    equal what the general path reads, and anything else must be left to it."""
    one = one_value_tensor(tensor)
    assert (one is not None) == fast
    try:
        general, _ = read_tensor(tensor, 0, memoryview(b""), 0)
    except InferenceError:
        assert not fast  # the general path refuses it, so the fast path must not read it
        return
    if one is not None:
        assert (one.name, one.datatype, one.shape) == (
            general.name,
            general.datatype,
            general.shape,
        )
        assert one.data.dtype == general.data.dtype
        np.testing.assert_array_equal(one.data, general.data)  # NaN equals NaN here
    (decoded,) = decode_request(json.dumps({"inputs": [tensor]}).encode()).inputs
    assert (decoded.shape, decoded.data.dtype) == (general.shape, general.data.dtype)
    np.testing.assert_array_equal(decoded.data, general.data)
