"""Production behaviour of real server processes: batching, limits, model control, shutdown.

Assertions read the server's own counters (/v2/models/<m>/stats, /metrics), never timings.
"""

import json
import shutil
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from bench.load.request_bodies import encode_inputs
from mlet.spec import ExportSpec
from serve.process import running_server
from tests.helpers import wait_for


def spec_of(repo, name) -> ExportSpec:
    return ExportSpec.from_dict(json.loads((repo / name / "manifest.json").read_text())["spec"])


def request(url: str, payload: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of a GET (no payload) or POST."""
    method = "GET" if payload is None else "POST"
    req = urllib.request.Request(url, data=payload, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def infer(url, repo, model, rows=1, seed=0, binary=False, spec_from=None, **parameters):
    spec = spec_of(repo, spec_from or model)
    inputs = spec.random_inputs(rows, np.random.default_rng(seed))
    payload, headers = encode_inputs(spec, inputs, binary)
    if parameters:
        body = json.loads(payload)
        body.setdefault("parameters", {}).update(parameters)
        payload = json.dumps(body).encode()
    return request(f"{url}/v2/models/{model}/infer", payload, headers)


def stats(url, model) -> dict:
    status, _, body = request(f"{url}/v2/models/{model}/stats")
    assert status == 200
    return json.loads(body)["model_stats"][0]


def test_concurrent_requests_are_merged_into_one_execution(tiny_repo):
    options = ("--max-queue-delay-us", "5000000", "--preferred-batch-sizes", "8")
    with running_server(tiny_repo, ["mlet"], *options) as (url, _):
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(lambda i: infer(url, tiny_repo, "mlet", rows=2, seed=i), range(4))
            )
        assert [r[0] for r in results] == [200] * 4
        model = stats(url, "mlet")
        assert model["request_count"] == 4 and model["inference_count"] == 8
        assert model["execution_count"] == 1
        assert model["batch_stats"] == [{"batch_size": 8, "count": 1}]
        # every request got its own rows back: compare with ONNX Runtime in-process
        session = ort.InferenceSession(str(tiny_repo / "mlet" / "1" / "model.onnx"))
        for i, (_, _, body) in enumerate(results):
            inputs = spec_of(tiny_repo, "mlet").random_inputs(2, np.random.default_rng(i))
            got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32).reshape(2, 1)
            np.testing.assert_allclose(got, session.run(None, inputs)[0], atol=1e-6)


def test_batching_off_runs_every_request_alone(tiny_repo):
    # a long queue delay would merge these concurrent requests if batching were on
    flags = ("--batching", "off", "--max-queue-delay-us", "300000")
    with running_server(tiny_repo, ["full"], *flags) as (url, _):
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda i: infer(url, tiny_repo, "full", seed=i)[0], range(8)))
        assert codes == [200] * 8
        model = stats(url, "full")
        assert model["execution_count"] == 8
        assert model["batch_stats"] == [{"batch_size": 1, "count": 8}]


def test_timing_parameters_and_metrics(tiny_repo):
    with running_server(tiny_repo, ["full"]) as (url, _):
        status, _, body = infer(url, tiny_repo, "full", rows=3, timing=True)
        assert status == 200
        parameters = json.loads(body)["parameters"]
        assert parameters["batch_rows"] == 3 and parameters["compute_us"] >= 0
        assert infer(url, tiny_repo, "full", rows=600)[0] == 400  # above max batch 512
        status, headers, body = request(f"{url}/metrics")
        text = body.decode()
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert 'mlet_inference_requests_total{model="full",outcome="success"} 1.0' in text
        assert 'mlet_inference_requests_total{model="full",outcome="client_error"} 1.0' in text
        assert 'mlet_inference_rows_total{model="full"} 3.0' in text
        assert 'mlet_batch_rows_count{model="full"} 1.0' in text
        assert 'mlet_queue_duration_seconds_count{model="full"} 1.0' in text
        assert 'mlet_compute_duration_seconds_count{model="full"} 1.0' in text
        assert 'mlet_request_duration_seconds_count{model="full"} 1.0' in text


def test_full_queue_and_expired_timeout_answer_503(tiny_repo):
    options = ("--max-queue-rows", "1", "--max-queue-delay-us", "2000000")
    options += ("--preferred-batch-sizes", "64")
    with running_server(tiny_repo, ["full"], *options) as (url, _):
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(infer, url, tiny_repo, "full")
            wait_for(lambda: stats(url, "full")["request_count"] == 1)
            status, headers, body = infer(url, tiny_repo, "full")
            assert status == 503 and headers["Retry-After"] == "1"
            assert "bound of 1" in json.loads(body)["error"]
            assert waiting.result()[0] == 200
        # a request whose own timeout (1 microsecond) passes before its batch starts
        status, headers, body = infer(url, tiny_repo, "full", timeout=1)
        assert status == 503 and "waited" in json.loads(body)["error"]
        model = stats(url, "full")
        assert model["refused_queue_full"] == 1 and model["refused_timeout"] == 1


def reload_three_times(url, tiny_repo):
    for _ in range(3):
        assert request(f"{url}/v2/repository/models/mlet/unload", b"")[0] == 200
        assert infer(url, tiny_repo, "mlet")[0] == 404
        index = json.loads(request(f"{url}/v2/repository/index", b"")[2])
        assert {"name": "mlet", "state": "UNAVAILABLE", "reason": "not loaded"} in index
        assert request(f"{url}/v2/repository/models/mlet/load", b"")[0] == 200
        assert infer(url, tiny_repo, "mlet")[0] == 200
        # reloading the model that is under traffic swaps versions without failures
        assert request(f"{url}/v2/repository/models/full/load", b"")[0] == 200


def test_load_unload_and_reload_under_traffic(tiny_repo):
    control = ("--model-control-mode", "explicit")
    with running_server(tiny_repo, ["full", "mlet"], *control) as (url, _):
        failures, done = [], threading.Event()

        def traffic(model):
            count = 0
            while not done.is_set():
                status, _, body = infer(url, tiny_repo, model, rows=4, seed=count)
                count += 1
                if status != 200:
                    failures.append((model, status, body))
            return count

        with ThreadPoolExecutor(2) as pool:
            sent = [pool.submit(traffic, "full"), pool.submit(traffic, "full")]
            try:
                reload_three_times(url, tiny_repo)
            finally:
                done.set()  # a failed check must not leave the traffic running forever
            counts = [f.result() for f in sent]
        assert failures == []
        assert min(counts) > 0
        status, _, body = request(f"{url}/v2/repository/models/nope/load", b"")
        assert status == 404 and "nope" in json.loads(body)["error"]


def test_sigterm_answers_requests_in_flight_and_exits_zero(tiny_repo):
    options = ("--max-queue-delay-us", "1500000", "--preferred-batch-sizes", "64")
    with running_server(tiny_repo, ["mlet"], *options) as (url, process):
        with ThreadPoolExecutor(5) as pool:
            pending = [pool.submit(infer, url, tiny_repo, "mlet", 1, i) for i in range(5)]
            wait_for(lambda: stats(url, "mlet")["request_count"] == 5)
            process.send_signal(signal.SIGTERM)
            assert [p.result()[0] for p in pending] == [200] * 5
        assert process.wait(timeout=30) == 0


def test_batching_follows_config_pbtxt(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "full", repo / "full")
    config = repo / "full" / "config.pbtxt"
    text = config.read_text()
    start = text.index("dynamic_batching")
    config.write_text(text[:start] + text[text.index("}", start) + 1 :])
    with running_server(repo, ["full"]) as (url, _):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: infer(url, repo, "full", seed=i), range(4)))
        assert stats(url, "full")["execution_count"] == 4


def test_bad_config_pbtxt_fails_the_start_with_its_reason(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "full", repo / "full")
    (repo / "full" / "config.pbtxt").write_text("max_batch_size: oops\n")
    with (
        pytest.raises(RuntimeError, match="not a valid Triton model config"),
        running_server(repo, ["full"]),
    ):
        pass


def test_pytorch_backend_serves_the_uncollapsed_run(tiny_repo, tiny_runs):
    options = ("--torch-run", f"mlet-torch={tiny_runs['mlet']}")
    with running_server(tiny_repo, ["mlet"], *options) as (url, _):
        inputs_spec = spec_of(tiny_repo, "mlet")
        for binary in (False, True):
            status, headers, body = infer(
                url, tiny_repo, "mlet-torch", 5, 9, binary, spec_from="mlet"
            )
            assert status == 200
            if binary:
                length = int(headers["Inference-Header-Content-Length"])
                got = np.frombuffer(body[length:], np.float32).reshape(5, 1)
            else:
                got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32).reshape(5, 1)
            session = ort.InferenceSession(str(tiny_repo / "mlet" / "1" / "model.onnx"))
            expected = session.run(None, inputs_spec.random_inputs(5, np.random.default_rng(9)))[0]
            np.testing.assert_allclose(got, expected, atol=1e-5)
        metadata = json.loads(request(f"{url}/v2/models/mlet-torch")[2])
        assert metadata["platform"] == "pytorch"


def test_a_model_that_cannot_load_here_is_skipped_with_its_reason(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "full", repo / "full")
    shutil.copytree(tiny_repo / "mlet", repo / "broken")
    manifest = json.loads((repo / "broken" / "manifest.json").read_text())
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "broken" / "manifest.json").write_text(json.dumps({**manifest, "name": "broken"}))
    with running_server(repo, [], timeout=60) as (url, _):
        index = {m["name"]: m for m in json.loads(request(f"{url}/v2/repository/index")[2])}
        assert index["full"]["state"] == "READY"
        assert index["broken"]["state"] == "UNAVAILABLE" and index["broken"]["reason"]
        assert infer(url, repo, "full")[0] == 200
        assert infer(url, repo, "broken", spec_from="full")[0] == 404


@pytest.mark.tensorrt
def test_tensorrt_engine_is_served_with_onnxruntime_numbers(tiny_runs, tmp_path):
    from export.exporter import ExportConfig, export_variants
    from mlet.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"TensorRT engines cannot be built here: {reason}")
    repo = tmp_path / "repo"
    config = ExportConfig(name="m", max_batch_size=512, variants=("fp32", "trt"))
    export_variants(tiny_runs["mlet"], repo, config)
    with running_server(repo, ["m-trt"]) as (url, _):
        metadata = json.loads(request(f"{url}/v2/models/m-trt")[2])
        assert metadata["platform"] == "tensorrt_plan"
        status, _, body = infer(url, repo, "m-trt", rows=7, seed=3, spec_from="m")
        assert status == 200
        got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32).reshape(7, 1)
        session = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"))
        inputs = spec_of(repo, "m").random_inputs(7, np.random.default_rng(3))
        np.testing.assert_allclose(got, session.run(None, inputs)[0], atol=1e-4)
