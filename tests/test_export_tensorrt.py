"""TensorRT: compatibility checks without TensorRT, engines and CUDA where they exist."""

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import export.checks as checks
from export.exporter import ExportConfig, ExportError, export_variants
from export.runtimes import onnxruntime_probabilities
from export.tensorrt_checks import check_tensorrt_file, tensorrt_problems
from export.triton_config import render_config
from mlet import tensorrt as mlet_tensorrt
from mlet.dlrm import DLRM, build_config
from mlet.runtime import CUDA, SessionOptions, cuda_provider_reason, onnxruntime_runner
from mlet.spec import spec_for
from tests.helpers import lower_to_onnx

TENSORRT_REASON = mlet_tensorrt.unavailable_reason()
CUDA_REASON = cuda_provider_reason()


def tiny_model() -> DLRM:
    torch.manual_seed(0)
    return DLRM(build_config(3, [10, 20, 5], "mlet", dim=4, hidden=8), sparse=False).eval()


def make_model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def batch_input(name="x", elem=TensorProto.FLOAT, dims=(4,)):
    return helper.make_tensor_value_info(name, elem, ["batch", *dims])


def external_tensor(name: str, dims: list[int], elem=TensorProto.FLOAT) -> TensorProto:
    """An initializer declared with its dims only, as a loaded large model's are."""
    tensor = TensorProto(name=name, dims=dims, data_type=elem)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "absent.data"), ("offset", "0"), ("length", "0")):
        tensor.external_data.add(key=key, value=value)
    return tensor


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_exported_fp32_and_fp16_graphs_pass_the_checks(tmp_path, variant):
    model = tiny_model()
    path = tmp_path / "m.onnx"
    lower_to_onnx(model, spec_for(model.config), path, variant)
    assert check_tensorrt_file(path, max_batch_size=4096) == []


def test_int8_graph_fails_on_its_8_bit_gathers(tmp_path):
    model = tiny_model()
    path = tmp_path / "m.onnx"
    lower_to_onnx(model, spec_for(model.config), path, "int8")
    problems = check_tensorrt_file(path, max_batch_size=4096)
    # per table, the Gather of its int8 codes and the Cast that reads them
    assert len(problems) == 6
    assert sum("(Gather): input type INT8 is not supported" in p for p in problems) == 3
    assert sum("(Cast): input type INT8 is not supported" in p for p in problems) == 3


def test_unsupported_and_custom_ops_are_reported():
    x = batch_input()
    model = make_model(
        [
            helper.make_node("Unique", ["x"], ["u"], name="unique"),
            helper.make_node("MyOp", ["x"], ["y"], name="mine", domain="com.example"),
        ],
        [x],
        [batch_input("y")],
    )
    problems = tensorrt_problems(model, 64)
    assert any("does not support Unique" in p for p in problems)
    assert any("custom domain 'com.example'" in p for p in problems)


def test_tensors_of_two_to_the_31_elements_are_reported():
    ids = batch_input("ids", TensorProto.INT64, ())
    table = external_tensor("table", [2**27, 16])  # exactly 2^31 elements
    ok = external_tensor("ok", [2**27 - 1, 16])
    model = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["a"]),
            helper.make_node("Gather", ["ok", "ids"], ["b"]),
        ],
        [ids],
        [batch_input("a", dims=(16,)), batch_input("b", dims=(16,))],
        [table, ok],
    )
    problems = tensorrt_problems(model, 64)
    assert problems == ["tensor table [134217728, 16] holds 2,147,483,648 elements (>= 2^31)"]


def test_intermediate_tensors_are_sized_at_the_largest_batch():
    x = batch_input(dims=(1024,))
    weight = external_tensor("w", [1024, 2**20])  # 2^30 elements: fine on its own
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [batch_input("y", dims=(2**20,))],
        [weight],
    )  # fmt: skip
    assert tensorrt_problems(model, max_batch_size=2047) == []
    problems = tensorrt_problems(model, max_batch_size=2048)  # 2048 * 2^20 = 2^31
    assert problems == ["tensor y [2048, 1048576] holds 2,147,483,648 elements (>= 2^31)"]


def test_index_types_constant_shapes_and_static_dimensions():
    x = batch_input(dims=(4,))
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    free = helper.make_tensor_value_info("free", TensorProto.FLOAT, ["batch", "n"])
    table = helper.make_tensor("table", TensorProto.FLOAT, [3, 2], [0.0] * 6)
    model = make_model(
        [
            helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.UINT8),
            helper.make_node("Gather", ["table", "xi"], ["g"], name="uint8_ids"),
            helper.make_node("Reshape", ["x", "shape"], ["r"], name="dynamic_shape"),
            helper.make_node("Relu", ["free"], ["f"]),
        ],
        [x, shape, free],
        [batch_input("g", dims=(4, 2)), batch_input("r", dims=(4,)), batch_input("f", dims=(4,))],
        [table],
    )
    problems = tensorrt_problems(model, 64)
    assert "node uint8_ids (Gather): indices must be INT32 or INT64" in problems
    assert "node dynamic_shape (Reshape): input 1 must be a constant" in problems
    assert "input shape has no dynamic batch dimension" in problems
    assert "input free has a dynamic dimension besides the batch" in problems


def test_opset_outside_the_parser_range_is_reported():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [batch_input()], [batch_input("y")]
    )
    model.opset_import[0].version = 8
    assert tensorrt_problems(model, 64) == ["opset 8 is outside TensorRT's 9..24"]


def test_tensorrt_config_pbtxt():
    spec = spec_for(tiny_model().config, max_batch_size=2048)
    text = render_config("m-trt", spec, "tensorrt_plan")
    for expected in [
        'name: "m-trt"',
        'platform: "tensorrt_plan"',
        "max_batch_size: 2048",
        'name: "sparse"\n    data_type: TYPE_INT64\n    dims: [ 3 ]',
        "preferred_batch_size: [ 64, 256, 1024 ]",
        "kind: KIND_GPU",
    ]:
        assert expected in text
    assert spec.batch_profile() == (1, 1024, 2048)
    with pytest.raises(ValueError, match="platform must be one of"):
        render_config("m", spec, "pytorch_libtorch")


@pytest.mark.skipif(TENSORRT_REASON is None, reason="TensorRT is installed here")
def test_without_tensorrt_engines_are_skipped_with_the_reason(tiny_runs, tmp_path):
    assert "TensorRT" in TENSORRT_REASON or "CUDA" in TENSORRT_REASON
    config = ExportConfig(name="m", variants=("fp32", "trt", "trt-fp16"))
    report = export_variants(tiny_runs["full"], tmp_path, config)
    assert [r.name for r in report.results] == ["m"]
    assert report.skipped == {"trt": TENSORRT_REASON, "trt-fp16": TENSORRT_REASON}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(mlet_tensorrt.TensorRTUnavailable):
        mlet_tensorrt.build_engine(
            tmp_path / "m" / "1" / "model.onnx",
            tmp_path / "x.plan",
            {},
            mlet_tensorrt.BatchProfile(1, 1, 1),
        )


def stand_in_tensorrt(monkeypatch, error: float = 0.0) -> None:
    """Replace TensorRT by a stand-in: the "engine" is a copy of the ONNX file that ONNX
    Runtime runs, off by `error`. It exercises the exporter's engine path (build, compare,
    manifest, config, install) where TensorRT is absent; the real engine test is below."""

    def build_engine(onnx_path, plan_path, shapes, profile, workspace_bytes=0):
        for file in onnx_path.parent.iterdir():
            shutil.copy(file, plan_path if file == onnx_path else plan_path.parent / file.name)
        profile = {"min": profile.min, "opt": profile.opt, "max": profile.max}
        return {"tensorrt": "stand-in", "profile": profile, "build_seconds": 0.0}

    def run_engine(plan, inputs, batch):
        return onnxruntime_probabilities(plan, inputs, batch) + np.float32(error)

    monkeypatch.setattr(mlet_tensorrt, "unavailable_reason", lambda: None)
    monkeypatch.setattr(mlet_tensorrt, "build_engine", build_engine)
    monkeypatch.setattr(checks, "tensorrt_probabilities", run_engine)


def test_engine_variants_are_compared_and_installed(tiny_runs, tmp_path, monkeypatch):
    stand_in_tensorrt(monkeypatch)
    config = ExportConfig(name="m", variants=("fp32", "trt", "trt-fp16"), max_batch_size=512)
    report = export_variants(tiny_runs["mlet"], tmp_path, config)
    assert [r.name for r in report.results] == ["m", "m-trt", "m-trt-fp16"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-trt", "m-trt-fp16"]
    for result, source, tolerance in zip(
        report.results[1:], ["m", "m-fp16"], [1e-4, 5e-3], strict=True
    ):
        manifest = result.manifest.to_dict()
        assert manifest["platform"] == "tensorrt_plan" and manifest["model_file"] == "1/model.plan"
        assert (result.path / "1" / "model.plan").is_file()
        assert manifest["engine"]["source_model"] == source
        assert manifest["engine"]["profile"] == {"min": 1, "opt": 256, "max": 512}
        assert manifest["parity"]["tensorrt_max_abs_diff"] == 0
        assert manifest["parity"]["tolerance"] == tolerance
        assert manifest["accuracy"]["auc_difference"] is not None
        text = (result.path / "config.pbtxt").read_text()
        assert 'platform: "tensorrt_plan"' in text and "kind: KIND_GPU" in text
    again = export_variants(tiny_runs["mlet"], tmp_path, config)
    assert [r.status for r in again.results] == ["unchanged"] * 3


def test_an_engine_that_disagrees_with_onnx_runtime_is_not_kept(tiny_runs, tmp_path, monkeypatch):
    stand_in_tensorrt(monkeypatch, error=1e-3)
    config = ExportConfig(name="m", variants=("fp32", "trt"))
    with pytest.raises(ExportError, match="m-trt: TensorRT differs from ONNX Runtime on m by"):
        export_variants(tiny_runs["full"], tmp_path, config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.tensorrt
@pytest.mark.skipif(TENSORRT_REASON is not None, reason=f"TensorRT unavailable: {TENSORRT_REASON}")
def test_engines_are_built_run_and_compared(tiny_runs, tmp_path):
    config = ExportConfig(
        name="m", variants=("fp32", "fp16", "trt", "trt-fp16"), max_batch_size=512
    )
    report = export_variants(tiny_runs["mlet"], tmp_path, config)
    assert report.skipped == {}
    engines = {r.manifest.variant: r for r in report.results if r.name.endswith(("trt", "fp16"))}
    for variant in ("trt", "trt-fp16"):
        manifest = engines[variant].manifest.to_dict()
        assert manifest["platform"] == "tensorrt_plan"
        assert (engines[variant].path / "1" / "model.plan").is_file()
        assert manifest["engine"]["profile"] == {"min": 1, "opt": 256, "max": 512}
        assert manifest["parity"]["tensorrt_max_abs_diff"] <= manifest["parity"]["tolerance"]
        assert 'platform: "tensorrt_plan"' in (engines[variant].path / "config.pbtxt").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_REASON is not None, reason=f"no CUDA for ONNX Runtime: {CUDA_REASON}")
def test_cuda_execution_provider_parity(tiny_runs, tmp_path):
    report = export_variants(tiny_runs["full"], tmp_path, ExportConfig(name="m"))
    parity = report.results[0].manifest.parity
    assert parity["onnxruntime_providers"] == ["CPUExecutionProvider", CUDA]
    assert parity["providers"][CUDA] <= parity["tolerance"]
    session = onnxruntime_runner(tmp_path / "m" / "1" / "model.onnx", SessionOptions().on(CUDA))
    spec = report.results[0].manifest.spec
    assert session(spec.random_inputs(5, np.random.default_rng(0))).shape == (5, 1)
