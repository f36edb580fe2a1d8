"""`mlet predict`: raw rows through the exported model, with the training transform."""

import json

import numpy as np
import onnxruntime as ort
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from bench.inprocess.data_bench import generate_criteo
from cli import main
from data.engine import ConvertConfig, convert
from data.formats import criteo_format
from export.exporter import ExportConfig
from mlet.dataset import load_dataset
from mlet.encoding import OOV_ID
from predict.predict import PredictConfig, predict_files
from serve.process import running_server
from tests.conftest import tiny_train_config
from tests.helpers import export_run
from train.trainer import train_run

ROWS = 1500


@pytest.fixture(scope="module")
def criteo_model(tmp_path_factory):
    """A raw Criteo-format file, its dataset, and a tiny model exported from it."""
    root = tmp_path_factory.mktemp("predict")
    raw = root / "day.tsv"
    generate_criteo(raw, ROWS, seed=5)
    convert(raw, criteo_format(), root / "data", ConvertConfig(min_count=2, progress=False))
    train_run(root / "data", root / "run", tiny_train_config(dim=4))
    export_run(root / "run", root / "models", ExportConfig(name="criteo", max_batch_size=512))
    return raw, root / "data", root / "models"


def onnx_probabilities(model_folder, dense, sparse) -> np.ndarray:
    session = ort.InferenceSession(str(model_folder / "1" / "model.onnx"))
    inputs = {"dense": dense.astype(np.float32), "sparse": sparse.astype(np.int64)}
    return session.run(None, inputs)[0].reshape(-1)


def test_the_model_folder_carries_the_transform(criteo_model):
    _, data, models = criteo_model
    files = json.loads((models / "criteo" / "manifest.json").read_text())["files"]
    assert "transform.json" in files and "vocab.C1.npy" in files
    assert (models / "criteo" / "vocab.C1.npy").read_bytes() == (data / "vocab.C1.npy").read_bytes()


def test_predict_matches_onnx_runtime_on_the_converted_rows(criteo_model, tmp_path):
    raw, data, models = criteo_model
    result = predict_files(models / "criteo", [raw], tmp_path / "p.parquet", PredictConfig())
    table = pq.read_table(tmp_path / "p.parquet")
    dataset = load_dataset(data)
    expected = onnx_probabilities(models / "criteo", dataset.dense[:], dataset.sparse[:])
    assert result.rows == ROWS and table.column("row").to_pylist() == list(range(ROWS))
    assert table.column("label").to_numpy().tolist() == dataset.labels.tolist()
    np.testing.assert_allclose(table.column("probability").to_numpy(), expected, atol=1e-6)
    assert 0 < result.oov_share < 1  # min-count 2 leaves some values out of vocabulary


def test_unseen_values_use_the_oov_row_and_the_label_is_optional(criteo_model, tmp_path):
    raw, data, models = criteo_model
    first = raw.read_text().splitlines()[0].split("\t")
    unseen = first[1:14] + ["fedcba98"] * 26  # no label, 39 fields, values never seen
    (tmp_path / "new.tsv").write_text("\t".join(unseen) + "\n")
    result = predict_files(
        models / "criteo", [tmp_path / "new.tsv"], tmp_path / "p.csv", PredictConfig()
    )
    table = pacsv.read_csv(tmp_path / "p.csv")
    assert table.column_names == ["row", "probability"] and result.oov_share == 1.0
    dense = np.array([[float(v) if v else 0.0 for v in first[1:14]]])
    expected = onnx_probabilities(models / "criteo", dense, np.full((1, 26), OOV_ID))
    np.testing.assert_allclose(table.column("probability").to_numpy(), expected, atol=1e-6)


def test_predict_through_a_served_model_gives_the_same_numbers(criteo_model, tmp_path):
    raw, _, models = criteo_model
    local = tmp_path / "local.parquet"
    predict_files(models / "criteo", [raw], local, PredictConfig())
    with running_server(models, ["criteo"]) as (url, _):
        code = main(["predict", str(models / "criteo"), str(raw), "--out", str(tmp_path / "r.csv"),
                     "--url", url, "--request-rows", "500"])  # fmt: skip
    assert code == 0
    served = pacsv.read_csv(tmp_path / "r.csv").column("probability").to_numpy()
    np.testing.assert_allclose(
        served, pq.read_table(local).column("probability").to_numpy(), atol=1e-5
    )


def test_predict_refuses_a_model_without_transform(tmp_repo_without_transform, tmp_path):
    with pytest.raises(FileNotFoundError, match="no transform.json"):
        predict_files(
            tmp_repo_without_transform, [tmp_path / "x.tsv"], tmp_path / "p.csv", PredictConfig()
        )


@pytest.fixture
def tmp_repo_without_transform(tiny_repo):
    return tiny_repo / "full"  # exported from the synthetic dataset, which has no vocabularies
