"""A real server process, spoken to by the official tritonclient and by raw HTTP."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from cli import build_parser
from mlet.spec import ExportSpec
from serve.process import running_server
from tests.helpers import tritonclient_inputs


@pytest.fixture(scope="module")
def server(tiny_repo):
    with running_server(tiny_repo, ["full", "mlet"], "--max-body-bytes", "100000") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpclient.InferenceServerClient(server.removeprefix("http://")) as c:
        yield c


def spec_of(repo, name) -> ExportSpec:
    return ExportSpec.from_dict(json.loads((repo / name / "manifest.json").read_text())["spec"])


def in_process(repo, name, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"))
    return session.run(None, inputs)[0]


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlet")
    metadata = client.get_model_metadata("mlet")
    assert metadata["inputs"] == [
        {"name": "dense", "datatype": "FP32", "shape": [-1, 13]},
        {"name": "sparse", "datatype": "INT64", "shape": [-1, 5]},
    ]
    assert metadata["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]}]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("model", ["full", "mlet"])
def test_tritonclient_gets_the_in_process_numbers(client, tiny_repo, model, binary):
    inputs = spec_of(tiny_repo, model).random_inputs(17, np.random.default_rng(4))
    outputs = [httpclient.InferRequestedOutput("probability", binary_data=binary)]
    result = client.infer(
        model, tritonclient_inputs(inputs, binary), outputs=outputs, request_id="r1"
    )
    assert result.get_response()["id"] == "r1"
    np.testing.assert_allclose(
        result.as_numpy("probability"), in_process(tiny_repo, model, inputs), rtol=0, atol=1e-6
    )


def test_default_binary_client_without_outputs(client, tiny_repo):
    inputs = spec_of(tiny_repo, "full").random_inputs(3, np.random.default_rng(5))
    result = client.infer("full", tritonclient_inputs(inputs))
    np.testing.assert_allclose(
        result.as_numpy("probability"), in_process(tiny_repo, "full", inputs), atol=1e-6
    )


def post(url: str, payload: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=payload, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def infer_body(dense, sparse, dense_type="FP32", sparse_type="INT64") -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "dense", "datatype": dense_type, "shape": [1, len(dense)], "data": dense},
                {
                    "name": "sparse",
                    "datatype": sparse_type,
                    "shape": [1, len(sparse)],
                    "data": sparse,
                },
            ]
        }
    ).encode()


GOOD_DENSE = [1.0] * 13
GOOD_SPARSE = [0, 1, 2, 0, 3]


@pytest.mark.parametrize(
    "path, payload, status, message",
    [
        ("/v2/models/nope/infer", infer_body(GOOD_DENSE, GOOD_SPARSE), 404, "unknown model 'nope'"),
        (
            "/v2/models/mlet/versions/9/infer",
            infer_body(GOOD_DENSE, GOOD_SPARSE),
            404,
            "no version",
        ),
        ("/v2/models/mlet/infer", b"{", 400, "not valid JSON"),
        (
            "/v2/models/mlet/infer",
            infer_body(GOOD_DENSE, [0, 1, 2, 0, 30]),
            400,
            "outside table C5",
        ),
        (
            "/v2/models/mlet/infer",
            infer_body(GOOD_DENSE[:5], GOOD_SPARSE),
            400,
            "'dense' has shape",
        ),
        (
            "/v2/models/mlet/infer",
            infer_body(GOOD_DENSE, GOOD_SPARSE, sparse_type="FP32"),
            400,
            "datatype",
        ),
        ("/v2/models/mlet/infer", b"x" * 200_000, 413, "exceeds the limit"),
    ],
)
def test_bad_requests_get_4xx_naming_the_problem(server, path, payload, status, message):
    code, body = post(server + path, payload)
    assert code == status
    assert message in body["error"]
    assert "Traceback" not in body["error"]


def test_oversized_batch_is_refused(server):
    rows = 513  # the tiny models were exported with a maximum batch of 512
    payload = json.dumps(
        {
            "inputs": [
                {
                    "name": "dense",
                    "datatype": "FP32",
                    "shape": [rows, 13],
                    "data": [0.0] * 13 * rows,
                },
                {"name": "sparse", "datatype": "INT64", "shape": [rows, 5], "data": [0] * 5 * rows},
            ]
        }
    ).encode()
    code, body = post(server + "/v2/models/full/infer", payload)
    assert code == 400 and "maximum of 512" in body["error"]


def test_unknown_model_metadata_is_404(server):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server + "/v2/models/nope", timeout=10)
    assert error.value.code == 404
    assert json.loads(error.value.read()) == {"error": "unknown model 'nope'"}


def test_server_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--repo", "models"])
    assert args.host == "127.0.0.1"


def test_the_server_imports_neither_torch_nor_pyarrow_until_a_model_needs_them():
    """torch serves PyTorch runs only, pyarrow raw-row transform steps only."""
    code = "import sys, serve.server, serve.grpc_server; "
    code += "print('torch' in sys.modules, 'pyarrow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert result.stdout.split() == ["False", "False"]
