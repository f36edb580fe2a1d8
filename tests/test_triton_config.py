"""The Triton config we write and serve, without Triton: parameters, refusals, JSON, plans."""

from __future__ import annotations

import shutil

import pytest
import tritonclient.http as httpclient

from export.triton_config import (
    DENSE_TRANSFORM_PARAMETER,
    TABLE_NAMES_PARAMETER,
    TABLE_ROWS_PARAMETER,
    check_triton_config,
    render_config,
)
from mlet.spec import ExportSpec, TensorSpec
from serve.process import running_server
from serve.triton_engine import (
    TritonInstall,
    TritonUnavailable,
    backend_directory,
    backend_plan,
    models_to_load,
)
from serve.triton_json import model_config_json

SPEC = ExportSpec(
    inputs=(TensorSpec("dense", "FP32", (13,)), TensorSpec("sparse", "INT64", (3,))),
    outputs=(TensorSpec("probability", "FP32", (1,)),),
    table_rows=(50, 7, 120),
    table_names=("C1", "C2", "C3"),
    max_batch_size=512,
    preferred_batch_sizes=(64, 256),
)


def test_config_carries_table_sizes_and_dense_transform(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(render_config("m", SPEC, dense_transform="log1p"))
    config = model_config_json(tmp_path / "m", "m")
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters == {
        TABLE_ROWS_PARAMETER: "50,7,120",
        TABLE_NAMES_PARAMETER: "C1,C2,C3",
        DENSE_TRANSFORM_PARAMETER: "log1p: log(1 + max(x, 0))",
    }
    # as Triton prints it: completed fields, enum names, 64-bit integers as numbers
    assert config["backend"] == "onnxruntime" and config["max_batch_size"] == 512
    assert config["input"][1]["dims"] == [3] and config["input"][1]["data_type"] == "TYPE_INT64"
    assert config["dynamic_batching"]["preferred_batch_size"] == [64, 256]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert config["instance_group"][0]["name"] == "m_0"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}


@pytest.mark.parametrize(
    "spec, name, words",
    [
        (SPEC.__class__(**{**SPEC.__dict__, "preferred_batch_sizes": (64, 1024)}), "m",
         "preferred size must be <= max batch size"),
        (SPEC.__class__(**{**SPEC.__dict__, "preferred_batch_sizes": (0,)}), "m",
         "preferred size must be positive"),
        (SPEC.__class__(**{**SPEC.__dict__, "max_batch_size": -1, "preferred_batch_sizes": ()}),
         "m", "'max_batch_size' must be non-negative"),
        (SPEC.__class__(**{**SPEC.__dict__, "inputs": (TensorSpec("dense", "FP32", (0,)),
                                                         SPEC.inputs[1])}), "m",
         "dimension must be integer >= 1, or -1"),
    ],
)  # fmt: skip
def test_export_refuses_what_triton_refuses(spec, name, words):
    with pytest.raises(ValueError, match="Triton would refuse") as refused:
        render_config(name, spec)
    assert words in str(refused.value)


def test_a_name_other_than_the_folder_is_refused():
    with pytest.raises(ValueError, match="directory name must equal model name"):
        check_triton_config(render_config("m", SPEC), "other")


def test_tensorrt_plans_are_skipped_without_the_native_backend(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "mlet", repo / "mlet")
    shutil.copytree(tiny_repo / "mlet", repo / "mlet-trt")
    config = repo / "mlet-trt" / "config.pbtxt"
    config.write_text(
        config.read_text()
        .replace('"mlet"', '"mlet-trt"')
        .replace("onnxruntime_onnx", "tensorrt_plan")
    )
    wheel_like = TritonInstall(tmp_path / "bin" / "tritonserver", tmp_path / "backends", "test")
    plan = backend_plan(wheel_like)
    assert "Python-based" in plan["onnxruntime"] and "tensorrt" not in plan
    load, skipped = models_to_load(repo, None, plan)
    assert load == ["mlet"]
    assert "native tensorrt backend" in skipped["mlet-trt"]
    with pytest.raises(RuntimeError, match="native tensorrt backend"):
        models_to_load(repo, ["mlet-trt"], plan)  # asked for by name: it must load


def test_our_server_answers_get_model_config(tiny_repo):
    with (
        running_server(tiny_repo, ["mlet"]) as (url, _),
        httpclient.InferenceServerClient(url.removeprefix("http://")) as client,
    ):
        config = client.get_model_config("mlet")
        assert config == client.get_model_config("mlet", model_version="1")
        assert config == model_config_json(tiny_repo / "mlet", "mlet")
        rows = config["parameters"][TABLE_ROWS_PARAMETER]["string_value"]
        assert rows == "50,7,120,3,30"
        with pytest.raises(Exception, match="unknown model"):
            client.get_model_config("nope")


def test_serve_engine_triton_refuses_our_batching_options(tiny_repo, capsys):
    from cli import main

    assert main(["serve", "--engine", "triton", "--repo", str(tiny_repo), "--batching", "off"]) == 2
    assert "batching options apply to --engine mlet" in capsys.readouterr().err


def test_a_native_onnxruntime_backend_is_used_as_installed(tmp_path):
    backends = tmp_path / "backends"
    (backends / "onnxruntime").mkdir(parents=True)
    (backends / "onnxruntime" / "libtriton_onnxruntime.so").touch()
    native = TritonInstall(tmp_path / "tritonserver", backends, "test")
    assert backend_plan(native)["onnxruntime"] == "Triton's native onnxruntime backend"
    assert backend_directory(native, tmp_path / "work") == backends
    (backends / "onnxruntime" / "libtriton_onnxruntime.so").unlink()
    with pytest.raises(TritonUnavailable, match="neither the native onnxruntime backend"):
        backend_directory(native, tmp_path / "work")
