"""Two processes under torchrun: the same command line, the same accuracy, a run like any other."""

import json
import os

import numpy as np
import pytest

from cli import main
from export.exporter import ExportConfig
from mlet.repository import open_model
from mlet.runtime import onnxruntime_runner, torch_runner
from tests.helpers import export_run
from train.cli import _without_nproc

ARGS = ["--embedding", "mlet", "--dim", "8", "--hidden", "16", "--bottom-mlp", "8",
        "--top-mlp", "8", "--epochs", "3", "--batch-size", "256"]  # fmt: skip


@pytest.fixture(scope="module")
def one_and_two(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    for n in (1, 2):
        out = root / f"p{n}"
        assert (
            main(["train", "--data", str(tiny_data), "--out", str(out), *ARGS, "--nproc", str(n)])
            == 0
        )
    return root / "p1", root / "p2"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two processes need two CPU cores")
def test_two_processes_reach_the_accuracy_of_one(one_and_two):
    one, two = (json.loads((run / "metrics.json").read_text()) for run in one_and_two)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert set(two["sharding"].values()) <= {"table_wise", "column_wise"}
    # the same data and seed split differently over ranks: run-to-run noise, not a bias
    assert abs(one["test"]["auc"] - two["test"]["auc"]) < 0.02
    assert abs(one["test"]["logloss"] - two["test"]["logloss"]) < 0.01


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two processes need two CPU cores")
def test_a_two_process_run_exports_like_any_other(one_and_two, tmp_path):
    run = one_and_two[1]
    export_run(run, tmp_path / "models", ExportConfig(name="two"))
    torch_model, spec = torch_runner(run)
    inputs = spec.random_inputs(16, np.random.default_rng(0))
    onnx_model = onnxruntime_runner(open_model(tmp_path / "models" / "two").model_path)
    np.testing.assert_allclose(onnx_model(inputs), torch_model(inputs), atol=1e-5)


def test_more_processes_than_cores_are_refused(tiny_data, tmp_path):
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(SystemExit, match=f"--nproc {too_many} is more than"):
        main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--dim", "4",
              "--nproc", str(too_many)])  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_the_launched_command_is_the_same_without_nproc():
    argv = ["train", "--data", "d", "--nproc", "2", "--dim", "4", "--nproc=3"]
    assert _without_nproc(argv) == ["train", "--data", "d", "--dim", "4"]
