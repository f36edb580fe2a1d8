"""`mlet predict --url --protocol http|grpc`, with and without --raw, against both engines:
the served probabilities are the local ones, and a refusal names the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

from bench.inprocess.data_bench import generate_criteo
from cli import main
from data.engine import ConvertConfig, convert
from data.formats import criteo_format
from export.exporter import ExportConfig, export_variants
from predict.predict import PredictConfig, predict_files
from serve.process import HOST, free_port, running_server
from serve.triton_engine import TritonConfig, running_triton, unavailable_reason
from tests.conftest import tiny_train_config
from train.trainer import train_run

TRITON = unavailable_reason()
RAW_MODELS = ["criteo", "criteo-transform", "criteo-raw"]


def criteo_raw_repo(root: Path, rows: int = 1200) -> tuple[Path, Path]:
    """(a raw Criteo file, a repository of a tiny model of it with criteo-raw beside)."""
    raw = root / "day.tsv"
    generate_criteo(raw, rows, seed=5)
    convert(raw, criteo_format(), root / "data", ConvertConfig(min_count=2, progress=False))
    train_run(root / "data", root / "run", tiny_train_config(dim=4))
    export_variants(root / "run", root / "models", ExportConfig(name="criteo", max_batch_size=512))
    return raw, root / "models"


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    """(raw file, repository, the probabilities `mlet predict` computes locally)."""
    root = tmp_path_factory.mktemp("predict-grpc")
    raw, repo = criteo_raw_repo(root)
    predict_files(repo / "criteo", [raw], root / "local.csv", PredictConfig())
    return raw, repo, probabilities(root / "local.csv")


def probabilities(path: Path) -> np.ndarray:
    return pacsv.read_csv(path).column("probability").to_numpy()


@pytest.fixture(scope="module")
def ours(criteo):
    """(HTTP url, gRPC address) of our server with the model and its raw-row ensemble."""
    port = free_port()
    with running_server(criteo[1], RAW_MODELS, "--grpc-port", str(port)) as (url, _):
        yield url, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def triton(criteo, tmp_path_factory):
    if TRITON:
        pytest.skip(f"no Triton here: {TRITON}")
    log = tmp_path_factory.mktemp("triton-predict") / "triton.log"
    config = TritonConfig(repo=criteo[1], port=free_port(), grpc_port=free_port(),
                          models=RAW_MODELS)  # fmt: skip
    with running_triton(config, log) as server:
        yield server.url, server.grpc_address


def endpoint(servers: dict, engine: str, protocol: str, request) -> str:
    url, address = request.getfixturevalue(servers[engine])
    return address if protocol == "grpc" else url


@pytest.mark.parametrize("engine", ["mlet", "triton"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("raw", [False, True], ids=["ids", "raw"])
def test_served_scores_are_the_local_ones(criteo, engine, protocol, raw, request, tmp_path):
    raw_file, repo, local = criteo
    url = endpoint({"mlet": "ours", "triton": "triton"}, engine, protocol, request)
    config = PredictConfig(url=url, protocol=protocol, raw=raw, request_rows=300)
    result = predict_files(repo / "criteo", [raw_file], tmp_path / "served.csv", config)
    assert result.rows == len(local)
    np.testing.assert_allclose(probabilities(tmp_path / "served.csv"), local, atol=1e-6)


def test_the_command_takes_the_protocol(criteo, ours, tmp_path):
    raw_file, repo, local = criteo
    argv = ["predict", str(repo / "criteo"), str(raw_file), "--out", str(tmp_path / "p.csv"),
            "--url", ours[1], "--protocol", "grpc", "--raw", "--request-rows", "500"]  # fmt: skip
    assert main(argv) == 0
    np.testing.assert_allclose(probabilities(tmp_path / "p.csv"), local, atol=1e-6)


@pytest.mark.parametrize(
    "protocol, message",
    [("http", r"model 'criteo-raw' at http://.*: HTTP 400: .*512"),
     ("grpc", r"model 'criteo-raw': gRPC INVALID_ARGUMENT: .*512")],
)  # fmt: skip
def test_a_refusal_names_the_model(criteo, ours, protocol, message, tmp_path):
    raw_file, repo, _ = criteo
    url = ours[1] if protocol == "grpc" else ours[0]
    config = PredictConfig(url=url, protocol=protocol, raw=True, request_rows=600)  # > 512
    with pytest.raises(RuntimeError, match=message):
        predict_files(repo / "criteo", [raw_file], tmp_path / "p.csv", config)
    assert not (tmp_path / "p.csv").exists()


def test_an_unreachable_grpc_server_names_the_model(criteo, tmp_path):
    raw_file, repo, _ = criteo
    config = PredictConfig(url=f"{HOST}:{free_port()}", protocol="grpc", timeout_s=5)
    with pytest.raises(RuntimeError, match="model 'criteo': gRPC UNAVAILABLE"):
        predict_files(repo / "criteo", [raw_file], tmp_path / "p.csv", config)


def test_the_protocol_is_http_or_grpc():
    with pytest.raises(ValueError, match="protocol must be one of"):
        PredictConfig(url="x", protocol="websocket")
    with pytest.raises(ValueError, match="give --url too"):
        PredictConfig(raw=True, protocol="grpc")
