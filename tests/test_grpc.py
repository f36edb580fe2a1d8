"""KServe v2 gRPC: `mlet serve --grpc-port` spoken to by the stock tritonclient.grpc.

Assertions read the server's own counters (ModelStatistics, /stats, /metrics), never timings.
"""

import json
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from mlet.spec import ExportSpec
from serve.grpc_server import InferenceServicer
from serve.process import HOST, free_port, running_server
from serve.triton_engine import TritonConfig, grpc_options
from tests.helpers import grpc_inputs, tritonclient_inputs, wait_for

LIMIT = 100_000  # --max-body-bytes of the main server


def spec_of(repo, name) -> ExportSpec:
    return ExportSpec.from_dict(json.loads((repo / name / "manifest.json").read_text())["spec"])


def in_process(repo, name, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"))
    return session.run(None, inputs)[0]


def grpc_infer(client, model, inputs, **options) -> np.ndarray:
    outputs = [grpcclient.InferRequestedOutput("probability")]
    result = client.infer(model, grpc_inputs(inputs), outputs=outputs, **options)
    return result.as_numpy("probability")


@pytest.fixture(scope="module")
def server(tiny_repo):
    """(HTTP url, gRPC address) of a server with a small body limit."""
    port = free_port()
    options = ("--grpc-port", str(port), "--max-body-bytes", str(LIMIT))
    with running_server(tiny_repo, ["full", "mlet"], *options) as (url, _):
        yield url, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server[1]) as c:
        yield c


@pytest.fixture(scope="module")
def http_client(server):
    with httpclient.InferenceServerClient(server[0].removeprefix("http://")) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    """The proto's generated stub, for messages tritonclient never builds (typed contents)."""
    with grpc.insecure_channel(server[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def http_stats(url, model) -> dict:
    with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=10) as response:
        return json.loads(response.read())["model_stats"][0]


# -- health, metadata, config -------------------------------------------------------------


def test_liveness_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlet") and client.is_model_ready("full", "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("mlet", "9")


def test_server_and_model_metadata(client, http_client):
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "mlet" and "model_repository" in server["extensions"]
    metadata = client.get_model_metadata("mlet", as_json=True)
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("dense", "FP32", ["-1", "13"]),
        ("sparse", "INT64", ["-1", "5"]),
    ]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("probability", "FP32")]
    error = refusal(lambda: client.get_model_metadata("nope"))
    assert error.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in error.message()


def test_model_config_equals_the_http_answer(client, http_client):
    for model in ("full", "mlet"):
        config = client.get_model_config(model).config
        assert config.name == model and config.max_batch_size == 512
        assert [i.name for i in config.input] == ["dense", "sparse"]
        over_http = json_format.ParseDict(
            http_client.get_model_config(model), model_config_pb2.ModelConfig()
        )
        assert config == over_http


# -- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["full", "mlet"])
def test_raw_inputs_give_the_http_and_in_process_numbers(client, http_client, tiny_repo, model):
    inputs = spec_of(tiny_repo, model).random_inputs(17, np.random.default_rng(4))
    result = client.infer(model, grpc_inputs(inputs), request_id="r1")
    got = result.as_numpy("probability")
    assert result.get_response().id == "r1" and got.shape == (17, 1) and got.dtype == np.float32
    over_http = http_client.infer(model, tritonclient_inputs(inputs)).as_numpy("probability")
    np.testing.assert_allclose(got, over_http, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, in_process(tiny_repo, model, inputs), rtol=0, atol=1e-6)


def contents_request(model: str, inputs: dict) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        tensor = request.inputs.add(name=name, shape=array.shape)
        if array.dtype == np.float32:
            tensor.datatype = "FP32"
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            tensor.datatype = "INT64"
            tensor.contents.int64_contents.extend(array.ravel().tolist())
    return request


def test_typed_contents_give_the_same_numbers_as_raw_inputs(client, stub, tiny_repo):
    inputs = spec_of(tiny_repo, "mlet").random_inputs(9, np.random.default_rng(6))
    response = stub.ModelInfer(contents_request("mlet", inputs), timeout=30)
    assert [o.name for o in response.outputs] == ["probability"]
    assert list(response.outputs[0].shape) == [9, 1] and len(response.raw_output_contents) == 1
    got = grpcclient.InferResult(response).as_numpy("probability")
    np.testing.assert_allclose(got, grpc_infer(client, "mlet", inputs), rtol=0, atol=1e-6)


def test_contents_and_raw_inputs_must_each_be_complete(stub, tiny_repo):
    inputs = spec_of(tiny_repo, "mlet").random_inputs(2, np.random.default_rng(1))
    short = contents_request("mlet", inputs)
    del short.inputs[0].contents.fp32_contents[-1]
    mixed = contents_request("mlet", inputs)
    mixed.raw_input_contents.append(inputs["dense"].tobytes())  # one raw entry for two inputs
    half = contents_request("mlet", inputs)
    half.inputs[1].datatype = "FP16"
    cases = [
        (short, "input 'dense': 'fp32_contents' holds 25 values but shape [2, 13] needs 26"),
        (mixed, "1 raw_input_contents for 2 inputs"),
        (half, "input 'sparse': datatype FP16 is sent in raw_input_contents"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in refused.value.details()


def bad_inputs(spec: ExportSpec, fault: str) -> dict:
    inputs = spec.random_inputs(3, np.random.default_rng(2))
    if fault == "shape":
        inputs["dense"] = inputs["dense"][:, :5].copy()
    elif fault == "dtype":
        inputs["sparse"] = inputs["sparse"].astype(np.int32)
    elif fault == "id":
        inputs["sparse"][1, 4] = 30  # table C5 has 30 rows
    elif fault == "batch":
        inputs = spec.random_inputs(513, np.random.default_rng(2))  # the maximum is 512
    return inputs


@pytest.mark.parametrize(
    "fault, model, code, message",
    [
        ("shape", "mlet", "INVALID_ARGUMENT", "'dense' has shape [3, 5], expected [batch, 13]"),
        ("dtype", "mlet", "INVALID_ARGUMENT", "input 'sparse' has datatype INT32, expected INT64"),
        ("id", "mlet", "INVALID_ARGUMENT", "row 1: id 30 is outside table C5 (valid ids 0..29)"),
        ("batch", "mlet", "INVALID_ARGUMENT", "batch 513, above the model's maximum of 512"),
        ("none", "nope", "NOT_FOUND", "unknown model 'nope'"),
    ],
)  # fmt: skip
def test_bad_requests_get_the_status_and_a_message_naming_the_problem(
    client, tiny_repo, fault, model, code, message
):
    inputs = bad_inputs(spec_of(tiny_repo, "mlet"), fault)
    error = refusal(lambda: grpc_infer(client, model, inputs))
    assert error.status() == f"StatusCode.{code}"
    assert message in error.message() and "Traceback" not in error.message()


@pytest.mark.parametrize("rpc", ["ModelInfer", "ModelMetadata", "RepositoryIndex"])
def test_a_malformed_message_is_invalid_argument_and_the_server_stays_up(server, client, rpc):
    with grpc.insecure_channel(server[1]) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")  # bytes as sent
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\x0a\xff\xff\xff", timeout=10)  # a length running past the message
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed inference." in refused.value.details()
    assert client.is_server_ready()


def test_a_message_over_the_size_limit_is_refused(client, tiny_repo):
    inputs = spec_of(tiny_repo, "full").random_inputs(1200, np.random.default_rng(0))
    assert sum(a.nbytes for a in inputs.values()) > LIMIT
    error = refusal(lambda: grpc_infer(client, "full", inputs))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in error.message() and str(LIMIT) in error.message()
    assert client.is_server_live()  # and the server serves on


# -- statistics and metrics -----------------------------------------------------------------


def grpc_counts(client, model) -> tuple[int, int, int, int]:
    """(inferences, executions, successes, failures) from ModelStatistics."""
    stats = client.get_inference_statistics(model).model_stats[0]
    inference = stats.inference_stats
    return (stats.inference_count, stats.execution_count, inference.success.count,
            inference.fail.count)  # fmt: skip


def metric(url, line: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = [row for row in text.splitlines() if row.startswith(line + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def test_statistics_and_metrics_count_grpc_requests(client, server, tiny_repo):
    url = server[0]
    spec = spec_of(tiny_repo, "full")
    success = 'mlet_inference_requests_total{model="full",outcome="success"}'
    client_error = 'mlet_inference_requests_total{model="full",outcome="client_error"}'
    before = grpc_counts(client, "full"), http_stats(url, "full")
    metrics_before = metric(url, success), metric(url, client_error)
    for seed in range(3):
        grpc_infer(client, "full", spec.random_inputs(2, np.random.default_rng(seed)))
    refusal(lambda: grpc_infer(client, "full", bad_inputs(spec, "id")))
    inferences, executions, successes, failures = grpc_counts(client, "full")
    assert inferences - before[0][0] == 6 and executions - before[0][1] == 3
    assert successes - before[0][2] == 3 and failures == before[0][3]
    assert http_stats(url, "full")["request_count"] - before[1]["request_count"] == 3
    assert metric(url, success) - metrics_before[0] == 3
    assert metric(url, client_error) - metrics_before[1] == 1
    every = client.get_inference_statistics().model_stats  # no name: every model
    assert [s.name for s in every] == ["full", "mlet"]


# -- model control ----------------------------------------------------------------------------


def test_repository_rpcs_need_explicit_model_control(client):
    index = client.get_model_repository_index().models
    assert [(m.name, m.state) for m in index] == [("full", "READY"), ("mlet", "READY")]
    error = refusal(lambda: client.unload_model("mlet"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model control mode 'none'" in error.message()
    assert client.is_model_ready("mlet")


def test_load_and_unload_through_the_repository_rpcs(tiny_repo):
    port = free_port()
    options = ("--grpc-port", str(port), "--model-control-mode", "explicit")
    inputs = spec_of(tiny_repo, "mlet").random_inputs(4, np.random.default_rng(3))
    with (
        running_server(tiny_repo, ["full", "mlet"], *options),
        grpcclient.InferenceServerClient(f"{HOST}:{port}") as client,
        grpc.insecure_channel(f"{HOST}:{port}") as channel,
    ):
        expected = grpc_infer(client, "mlet", inputs)
        client.unload_model("mlet")
        assert not client.is_model_ready("mlet")
        error = refusal(lambda: grpc_infer(client, "mlet", inputs))
        assert error.status() == "StatusCode.NOT_FOUND"
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["mlet"].state == "UNAVAILABLE" and index["mlet"].reason == "not loaded"
        # the index's ready flag, which tritonclient never sets, keeps only ready models
        ready_only = service_pb2.RepositoryIndexRequest(ready=True)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert [m.name for m in stub.RepositoryIndex(ready_only, timeout=10).models] == ["full"]
        client.load_model("mlet")
        assert client.is_model_ready("mlet")
        np.testing.assert_allclose(grpc_infer(client, "mlet", inputs), expected, atol=1e-6)
        error = refusal(lambda: client.load_model("nope"))
        assert error.status() == "StatusCode.NOT_FOUND" and "no model 'nope'" in error.message()
        error = refusal(lambda: client.load_model("mlet", config="{}"))
        assert error.status() == "StatusCode.UNIMPLEMENTED" and "'config'" in error.message()


def test_naming_a_repository_is_unimplemented(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="x"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- batching, overload, deadlines, shutdown ----------------------------------------------------


def test_concurrent_grpc_and_http_requests_are_batched_together(tiny_repo):
    """16 senders, half over gRPC and half over HTTP, each waiting for its answer before the
    next: with a 5 s queue delay, a batch is sent only when all 16 rows wait, so 128
    one-row requests make exactly 8 executions of 16 rows, whatever the machine's speed."""
    port = free_port()
    options = ("--grpc-port", str(port), "--max-queue-delay-us", "5000000")
    options += ("--preferred-batch-sizes", "16")
    spec = spec_of(tiny_repo, "mlet")
    with running_server(tiny_repo, ["mlet"], *options) as (url, _):

        def sender(seed: int) -> list[tuple[dict, np.ndarray]]:
            rng, answers = np.random.default_rng(seed), []
            if seed % 2:
                with httpclient.InferenceServerClient(url.removeprefix("http://")) as own:
                    for _ in range(8):
                        inputs = spec.random_inputs(1, rng)
                        result = own.infer("mlet", tritonclient_inputs(inputs))
                        answers.append((inputs, result.as_numpy("probability")))
                return answers
            with grpcclient.InferenceServerClient(f"{HOST}:{port}") as own:
                for _ in range(8):
                    inputs = spec.random_inputs(1, rng)
                    answers.append((inputs, grpc_infer(own, "mlet", inputs)))
            return answers

        with ThreadPoolExecutor(16) as pool:
            answers = [a for many in pool.map(sender, range(16)) for a in many]
        with grpcclient.InferenceServerClient(f"{HOST}:{port}") as client:
            stats = client.get_inference_statistics("mlet").model_stats[0]
    assert len(answers) == 128
    merged = {name: np.concatenate([i[name] for i, _ in answers]) for name in answers[0][0]}
    got = np.concatenate([a for _, a in answers])
    np.testing.assert_allclose(got, in_process(tiny_repo, "mlet", merged), rtol=0, atol=1e-6)
    assert stats.inference_count == 128 and stats.execution_count == 8
    assert stats.inference_stats.success.count == 128
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(16, 8)]


def test_overload_and_timeouts_get_unavailable_and_deadline_exceeded(tiny_repo):
    port = free_port()
    options = ("--grpc-port", str(port), "--max-queue-rows", "1")
    options += ("--max-queue-delay-us", "2000000", "--preferred-batch-sizes", "64")
    spec = spec_of(tiny_repo, "full")
    inputs = spec.random_inputs(1, np.random.default_rng(0))
    with (
        running_server(tiny_repo, ["full"], *options) as (url, _),
        grpcclient.InferenceServerClient(f"{HOST}:{port}") as client,
    ):
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(grpc_infer, client, "full", inputs)  # waits 2 s for a batch
            wait_for(lambda: http_stats(url, "full")["request_count"] == 1)
            error = refusal(lambda: grpc_infer(client, "full", inputs))
            assert error.status() == "StatusCode.UNAVAILABLE" and "bound of 1" in error.message()
            waiting.result()
        # the request's own timeout (microseconds, as Triton reads it) passes in the queue
        error = refusal(lambda: grpc_infer(client, "full", inputs, timeout=1000))
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED" and "waited" in error.message()
        # the client's deadline: the server refuses the request then, instead of running it
        error = refusal(lambda: grpc_infer(client, "full", inputs, client_timeout=0.3))
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
        wait_for(lambda: http_stats(url, "full")["refused_timeout"] == 2)
        stats = http_stats(url, "full")
        assert stats["refused_queue_full"] == 1 and stats["execution_count"] == 1
        assert grpc_counts(client, "full")[3] == 3  # full queue and two timeouts: failures


def test_a_cancelled_call_frees_its_place_in_the_queue(tiny_repo):
    port = free_port()
    options = ("--grpc-port", str(port), "--max-queue-rows", "1")
    options += ("--max-queue-delay-us", "1000000", "--preferred-batch-sizes", "64")
    inputs = spec_of(tiny_repo, "full").random_inputs(1, np.random.default_rng(0))
    with (
        running_server(tiny_repo, ["full"], *options) as (url, _),
        grpcclient.InferenceServerClient(f"{HOST}:{port}") as client,
    ):
        call = client.async_infer("full", grpc_inputs(inputs), callback=lambda *_: None)
        wait_for(lambda: http_stats(url, "full")["request_count"] == 1)
        call.cancel()  # the queue's only row is free again, and the request never runs
        wait_for(lambda: http_stats(url, "full")["cancelled"] == 1)
        np.testing.assert_allclose(
            grpc_infer(client, "full", inputs), in_process(tiny_repo, "full", inputs), atol=1e-6
        )
        stats = http_stats(url, "full")
        assert stats["refused_queue_full"] == 0 and stats["inference_count"] == 1


def test_sigterm_drains_grpc_requests_in_flight(tiny_repo):
    port = free_port()
    options = ("--grpc-port", str(port), "--max-queue-delay-us", "1500000")
    options += ("--preferred-batch-sizes", "64")
    spec = spec_of(tiny_repo, "mlet")

    def send(seed: int) -> np.ndarray:
        with grpcclient.InferenceServerClient(f"{HOST}:{port}") as own:
            return grpc_infer(own, "mlet", spec.random_inputs(1, np.random.default_rng(seed)))

    with running_server(tiny_repo, ["mlet"], *options) as (url, process):
        with ThreadPoolExecutor(5) as pool:
            pending = [pool.submit(send, i) for i in range(5)]
            wait_for(lambda: http_stats(url, "mlet")["request_count"] == 5)
            process.send_signal(signal.SIGTERM)
            answers = [p.result() for p in pending]
        assert process.wait(timeout=30) == 0
    assert all(a.shape == (1, 1) for a in answers)


# -- what the server does not implement -------------------------------------------------------


def test_unsupported_rpcs_answer_unimplemented_saying_why(client):
    error = refusal(lambda: client.get_system_shared_memory_status())
    assert error.status() == "StatusCode.UNIMPLEMENTED" and "shared-memory" in error.message()
    error = refusal(lambda: client.get_trace_settings())
    assert error.status() == "StatusCode.UNIMPLEMENTED" and "TraceSetting" in error.message()


def test_every_rpc_of_the_service_is_answered_by_the_servicer():
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    base = service_pb2_grpc.GRPCInferenceServiceServicer
    for method in service.methods:
        assert getattr(InferenceServicer, method.name) is not getattr(base, method.name), method


def test_tritons_grpc_endpoint_is_off_unless_a_port_is_given(tmp_path):
    config = TritonConfig(repo=tmp_path, host="127.0.0.2", port=8000)
    assert grpc_options(config) == ["--allow-grpc=false"]
    config.grpc_port = 8001
    assert grpc_options(config) == [
        "--allow-grpc=true", "--grpc-address=127.0.0.2", "--grpc-port=8001"
    ]  # fmt: skip
