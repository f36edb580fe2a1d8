"""A model without numeric features (Avazu, a CSV of categoricals only) has no `dense` input:
it exports, serves and scores raw rows like any other, and nothing of size 0 reaches a runtime."""

import numpy as np
import onnx
import pyarrow.csv as pacsv
import pytest
import tritonclient.http as httpclient

from bench.load.request_bodies import RequestFactory
from cli import main
from mlet.repository import open_model
from mlet.runtime import onnxruntime_runner, torch_runner
from serve.fuzz import Fuzzer, fuzz
from serve.process import running_server
from tests.helpers import tritonclient_inputs
from tests.test_data_engine import AVAZU_HEADER, avazu_rows


@pytest.fixture(scope="module")
def avazu_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("avazu")
    (root / "train.csv").write_text(AVAZU_HEADER + "".join(avazu_rows(3000)))
    data, run, repo = root / "data", root / "run", root / "models"
    assert main(["data", "avazu", str(root / "train.csv"), "--out", str(data)]) == 0
    train = ["train", "--data", str(data), "--out", str(run), "--embedding", "mlet",
             "--dim", "4", "--hidden", "8", "--epochs", "1", "--batch-size", "256"]  # fmt: skip
    assert main(train) == 0
    assert main(["export", str(run), "--repo", str(repo), "--name", "av",
                 "--variants", "fp32,fp16,int8"]) == 0  # fmt: skip
    return root, run, repo


def test_the_exported_graphs_take_only_sparse(avazu_model):
    _, _, repo = avazu_model
    for name in ("av", "av-fp16", "av-int8"):
        model = open_model(repo / name)
        assert model.manifest.spec.input_names == ["sparse"]
        graph = onnx.load(str(model.model_path), load_external_data=False).graph
        assert [i.name for i in graph.input] == ["sparse"]
        assert 'name: "dense"' not in (repo / name / "config.pbtxt").read_text()


def test_onnx_and_the_server_answer_like_pytorch(avazu_model):
    _, run, repo = avazu_model
    torch_model, spec = torch_runner(run)
    inputs = spec.random_inputs(7, np.random.default_rng(1))
    assert list(inputs) == ["sparse"]
    expected = torch_model(inputs)
    onnx_model = onnxruntime_runner(open_model(repo / "av").model_path)
    np.testing.assert_allclose(onnx_model(inputs), expected, atol=1e-6)
    with running_server(repo, ["av"]) as (url, _):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        assert [i["name"] for i in client.get_model_metadata("av")["inputs"]] == ["sparse"]
        served = client.infer("av", tritonclient_inputs(inputs)).as_numpy("probability")
        np.testing.assert_allclose(served, expected, atol=1e-6)
        dense = httpclient.InferInput("dense", [7, 0], "FP32")
        dense.set_data_from_numpy(np.zeros((7, 0), np.float32))
        with pytest.raises(Exception, match="dense"):
            client.infer("av", [dense, *tritonclient_inputs(inputs)])


def test_predict_scores_raw_avazu_rows(avazu_model, tmp_path):
    root, _, repo = avazu_model
    raw = tmp_path / "raw.csv"
    raw.write_text(AVAZU_HEADER + "".join(avazu_rows(50)))
    out = tmp_path / "scores.csv"
    assert main(["predict", str(repo / "av"), str(raw), "--out", str(out)]) == 0
    scores = pacsv.read_csv(out).column("probability").to_numpy()
    assert len(scores) == 50 and np.all((scores > 0) & (scores < 1))
    with running_server(repo, ["av"]) as (url, _):
        served = tmp_path / "served.csv"
        assert main(["predict", str(repo / "av"), str(raw), "--out", str(served),
                     "--url", url]) == 0  # fmt: skip
    np.testing.assert_allclose(
        pacsv.read_csv(served).column("probability").to_numpy(), scores, atol=1e-6
    )


def test_load_test_bodies_and_fuzz_cases_need_no_dense(avazu_model):
    _, _, repo = avazu_model
    opened = open_model(repo / "av")
    spec = opened.manifest.spec
    assert list(RequestFactory(spec).inputs(3)) == ["sparse"]
    with running_server(repo, ["av"]) as (url, _):
        report = fuzz(Fuzzer(url, "av", opened.model_path, spec, hang_s=10.0), 60, seed=0)
    assert not report.failures()
