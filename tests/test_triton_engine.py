"""Real Triton Inference Server on what we export: loads, answers, batching, refusals."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from export.exporter import ExportConfig, export_variants
from export.triton_config import TABLE_ROWS_PARAMETER, check_triton_config
from mlet.repository import open_model
from mlet.spec import ExportSpec
from serve.process import free_port, running_server, wait_until_ready
from serve.triton_engine import (
    TritonConfig,
    running_triton,
    unavailable_reason,
    without_virtual_envs,
)
from tests.helpers import grpc_inputs, tritonclient_inputs

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no Triton here: {REASON}")
VARIANTS = ("fp32", "fp16", "int8", "int4")
MODELS = ("tiny", "tiny-fp16", "tiny-int8", "tiny-int4")


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def variants_repo(tiny_runs, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-models")
    export_variants(tiny_runs["mlet"], repo, ExportConfig(name="tiny", variants=VARIANTS))
    return repo


@pytest.fixture(scope="module")
def triton(variants_repo, tmp_path_factory):
    before = tree_digest(variants_repo)
    log = tmp_path_factory.mktemp("triton-log") / "triton.log"
    config = TritonConfig(repo=variants_repo, port=free_port(), grpc_port=free_port())
    with running_triton(config, log) as server:
        yield server
    assert tree_digest(variants_repo) == before, "Triton or the launcher changed the repository"


@pytest.fixture(scope="module")
def client(triton):
    with httpclient.InferenceServerClient(triton.url.removeprefix("http://")) as c:
        yield c


def spec_of(repo: Path, name: str) -> ExportSpec:
    return open_model(repo / name).manifest.spec


def infer(client, model: str, inputs: dict, binary: bool) -> np.ndarray:
    outputs = [httpclient.InferRequestedOutput("probability", binary_data=binary)]
    request = tritonclient_inputs(inputs, binary)
    return client.infer(model, request, outputs=outputs).as_numpy("probability")


def test_every_variant_loads_unmodified(triton, client):
    assert sorted(triton.loaded) == sorted(MODELS) and not triton.skipped
    assert all(client.is_model_ready(m) for m in MODELS)
    log = triton.log_text()
    for model in MODELS:
        assert f"successfully loaded '{model}'" in log
        if "Python-based" in triton.backends["onnxruntime"]:
            assert f"Python-based onnxruntime backend (ONNX Runtime {ort.__version__}" in log
            assert f"serves {model} version 1" in log


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", MODELS)
def test_answers_match_onnxruntime_in_process(client, variants_repo, model, binary):
    inputs = spec_of(variants_repo, model).random_inputs(37, np.random.default_rng(5))
    session = ort.InferenceSession(str(variants_repo / model / "1" / "model.onnx"))
    expected = session.run(None, inputs)[0]
    got = infer(client, model, inputs, binary)
    assert got.shape == (37, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_model_config_is_the_same_from_both_engines(client, variants_repo):
    with (
        running_server(variants_repo, list(MODELS)) as (url, _),
        httpclient.InferenceServerClient(url.removeprefix("http://")) as ours,
    ):
        for model in MODELS:
            theirs, mine = client.get_model_config(model), ours.get_model_config(model)
            for key in ("name", "platform", "backend", "max_batch_size", "input", "output"):
                assert mine[key] == theirs[key], key
            assert mine["dynamic_batching"] == theirs["dynamic_batching"]
            assert mine["parameters"] == theirs["parameters"]
            # everything else too, but for the library Triton names as its runtime
            assert {**mine, "runtime": ""} == {**theirs, "runtime": ""}
    rows = theirs["parameters"][TABLE_ROWS_PARAMETER]["string_value"]
    assert [int(n) for n in rows.split(",")] == list(spec_of(variants_repo, model).table_rows)


def test_tritonclient_grpc_infers_against_triton_as_against_ours(triton, variants_repo):
    inputs = spec_of(variants_repo, "tiny").random_inputs(11, np.random.default_rng(8))
    session = ort.InferenceSession(str(variants_repo / "tiny" / "1" / "model.onnx"))
    expected = session.run(None, inputs)[0]
    port = free_port()
    with (
        grpcclient.InferenceServerClient(triton.grpc_address) as theirs,
        running_server(variants_repo, ["tiny"], "--grpc-port", str(port)),
        grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as ours,
    ):
        for client in (theirs, ours):
            assert client.is_server_ready() and client.is_model_ready("tiny")
            got = client.infer("tiny", grpc_inputs(inputs)).as_numpy("probability")
            assert got.shape == (11, 1) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        metadata = [c.get_model_metadata("tiny", as_json=True) for c in (theirs, ours)]
        assert metadata[0]["inputs"] == metadata[1]["inputs"]
        assert metadata[0]["outputs"] == metadata[1]["outputs"]
        configs = [c.get_model_config("tiny").config for c in (theirs, ours)]
        for config in configs:
            config.runtime = ""  # the library each names as its runtime differs
        assert configs[0] == configs[1]


def triton_counts(client, model: str) -> tuple[int, int, dict[int, int]]:
    """Triton's statistics extension: (inferences, executions, {batch size: executions})."""
    stats = client.get_inference_statistics(model)["model_stats"][0]
    batches = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    return stats["inference_count"], stats["execution_count"], batches


def test_triton_merges_concurrent_requests(triton, client, variants_repo):
    spec = spec_of(variants_repo, "tiny")
    address = triton.url.removeprefix("http://")

    def sender(seed: int) -> list[np.ndarray]:
        # tritonclient's HTTP client is not thread-safe: one client per thread
        rng = np.random.default_rng(seed)
        with httpclient.InferenceServerClient(address) as own:
            return [infer(own, "tiny", spec.random_inputs(1, rng), True) for _ in range(8)]

    inferences, executions, batches = triton_counts(client, "tiny")
    sent = 0
    for _ in range(5):  # bounded: 16 senders x 8 one-row requests, until a batch merged
        with ThreadPoolExecutor(16) as pool:
            results = [r for rs in pool.map(sender, range(16)) for r in rs]
        assert len(results) == 128 and all(r.shape == (1, 1) for r in results)
        sent += len(results)
        now_inferences, now_executions, now_batches = triton_counts(client, "tiny")
        if now_executions - executions < now_inferences - inferences:
            break
    assert now_inferences - inferences == sent
    assert now_executions - executions < now_inferences - inferences
    grown = [n for n in now_batches if 1 < n <= 16 and now_batches[n] > batches.get(n, 0)]
    assert grown, now_batches


def test_one_bad_request_fails_alone(client, variants_repo):
    inputs = spec_of(variants_repo, "tiny").random_inputs(3, np.random.default_rng(1))
    inputs["sparse"][2, 1] = 7  # table C2 has 7 rows: ids 0..6
    with pytest.raises(InferenceServerException, match=r"row 2 column 1: id 7 is outside \[0, 7\)"):
        infer(client, "tiny", inputs, False)


# Each a config.pbtxt Triton refuses, and the words of its refusal.
BAD_CONFIGS = {
    "wrong-name": (
        lambda text: text.replace('name: "wrong-name"', 'name: "other"', 1),
        "directory name must equal model name",
    ),
    "big-preferred": (
        lambda text: text.replace("preferred_batch_size: [ ", "preferred_batch_size: [ 8192, "),
        "preferred size must be <= max batch size",
    ),
    "zero-preferred": (
        lambda text: text.replace("preferred_batch_size: [ ", "preferred_batch_size: [ 0, "),
        "preferred size must be positive",
    ),
    "negative-batch": (
        lambda text: text.replace("max_batch_size: 4096", "max_batch_size: -1"),
        "'max_batch_size' must be non-negative",
    ),
    "bad-dims": (
        lambda text: text.replace("dims: [ 13 ]", "dims: [ -2 ]"),
        "dimension must be integer >= 1, or -1",
    ),
}


def test_an_invalid_config_is_refused_by_export_and_by_triton(variants_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variants_repo / "tiny", repo / "tiny")
    good = (repo / "tiny" / "config.pbtxt").read_text()
    for name, (mutate, words) in BAD_CONFIGS.items():
        text = mutate(good.replace('name: "tiny"', f'name: "{name}"', 1))
        assert text != good.replace('name: "tiny"', f'name: "{name}"', 1), name
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            check_triton_config(text, name)  # what export runs before writing a config
        shutil.copytree(repo / "tiny", repo / name)
        (repo / name / "config.pbtxt").write_text(text)
    config = TritonConfig(repo=repo, port=free_port(), models=["tiny"])
    with (
        running_triton(config, tmp_path / "triton.log") as server,
        httpclient.InferenceServerClient(server.url.removeprefix("http://")) as client,
    ):
        for name, (_, words) in BAD_CONFIGS.items():
            with pytest.raises(InferenceServerException) as refused:
                client.load_model(name)
            assert not client.is_model_ready(name)
            # the reason, in Triton's words: in the reply, or in its log where the reply to a
            # failed repository poll is generic
            said = [str(refused.value)]
            said += [line for line in server.log_text().splitlines() if name in line]
            assert any(words in line for line in said), (name, said)
        assert client.is_model_ready("tiny")


def test_mlet_serve_engine_triton_stops_cleanly_on_sigterm(variants_repo, tmp_path):
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "cli", "serve", "--engine", "triton"]
    command += ["--repo", str(variants_repo), "--port", str(port), "--models", "tiny"]
    command += ["--grpc-port", str(grpc_port)]  # passed through to tritonserver
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(f"http://127.0.0.1:{port}", process, 120)
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                assert client.is_server_live() and client.is_model_ready("tiny")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=90) == 0
        finally:
            if process.poll() is None:
                process.kill()
    output = (tmp_path / "serve.log").read_text()
    assert "Triton serving tiny" in output and "tritonserver exited with code 0" in output
    assert f"Triton serving gRPC on 127.0.0.1:{grpc_port}" in output


def test_triton_runs_without_an_activated_virtual_environment_on_its_path(tmp_path):
    """The Python backend's stub takes the first python3 on PATH as its home: an activated
    venv of another Python gave it a foreign standard library (ssl failed to import)."""
    venv, plain = tmp_path / "venv", tmp_path / "tools"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /elsewhere\n")
    plain.mkdir()
    path = f"{venv / 'bin'}:{plain}::/usr/bin"
    assert without_virtual_envs(path) == f"{plain}:/usr/bin"
