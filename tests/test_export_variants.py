"""fp32, fp16, int8 and int4 variants: graphs against PyTorch, the repository, failures."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.checks as checks
from export.checks import check_onnx
from export.exporter import ExportConfig, ExportError, export_variants
from export.graph import LoweringOptions
from export.references import dequantized_copy
from mlet.dlrm import DLRM, build_config
from mlet.spec import ExportSpec, spec_for
from tests.helpers import lower_to_onnx


def random_model(hotness: int = 1, embedding: str = "mlet") -> DLRM:
    torch.manual_seed(0)
    hidden = 16 if embedding == "mlet" else None
    config = build_config(4, [40, 7, 300], embedding, dim=8, hidden=hidden, hotness=hotness)
    return DLRM(config, sparse=False).eval()


def probabilities(model: DLRM, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model.probability(*(torch.from_numpy(v) for v in inputs.values())).numpy()


@pytest.mark.parametrize("hotness", [1, 3])
def test_variant_graphs_against_pytorch_on_random_inputs(tmp_path, hotness):
    model = random_model(hotness)
    spec = spec_for(model.config)
    inputs = spec.random_inputs(500, np.random.default_rng(1))
    collapsed = model.collapsed()
    fp32 = probabilities(collapsed, inputs)
    got = {}
    for variant in ("fp32", "fp16", "int8", "int4"):
        path = tmp_path / f"{variant}.onnx"
        lowered = lower_to_onnx(model, spec, path, variant)
        assert check_onnx(path, spec) == []
        assert not lowered.external_data and not (tmp_path / f"{variant}.onnx.data").exists()
        got[variant] = ort.InferenceSession(str(path)).run(None, inputs)[0]
        assert got[variant].shape == (500, 1) and got[variant].dtype == np.float32
    np.testing.assert_allclose(got["fp32"], fp32, atol=1e-6)
    # int8 and int4 compute exactly what PyTorch computes on the dequantized rows
    for variant in ("int8", "int4"):
        expected = probabilities(dequantized_copy(collapsed, variant), inputs)
        np.testing.assert_allclose(got[variant], expected, atol=1e-6)
    assert 0 < np.abs(got["int8"] - fp32).max() < np.abs(got["int4"] - fp32).max() < 0.1
    # fp16 carries float16 rounding, well inside its tolerance
    assert 0 < np.abs(got["fp16"] - fp32).max() < spec_for(model.config, variant="fp16").tolerance


def test_variant_graph_types_and_table_bytes(tmp_path):
    model = random_model()
    spec = spec_for(model.config)
    rows = sum(t.rows for t in model.config.tables)
    sizes = {}
    for variant in ("fp32", "fp16", "int8", "int4"):
        path = tmp_path / f"{variant}.onnx"
        sizes[variant] = lower_to_onnx(model, spec, path, variant).table_bytes
        graph = onnx.load(str(path)).graph
        tables = {t.name: t for t in graph.initializer if t.name.startswith("table.")}
        types = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in tables.values()}
        inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
        assert inputs == {"dense": onnx.TensorProto.FLOAT, "sparse": onnx.TensorProto.INT64}
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        mlp = next(t for t in graph.initializer if t.name == "top.0.weight")
        if variant in ("int8", "int4"):
            codes_type = np.int8 if variant == "int8" else np.uint8
            assert types == {np.dtype(codes_type), np.dtype(np.float16)}
            assert {t.name for t in tables.values()} >= {"table.C1.codes", "table.C1.scale"}
            assert mlp.data_type == onnx.TensorProto.FLOAT16  # stored small, cast up once
            codes = next(t for t in tables.values() if t.name == "table.C1.codes")
            assert codes.dims[1] == (8 if variant == "int8" else 4)
        else:
            expected = np.float16 if variant == "fp16" else np.float32
            assert types == {np.dtype(expected)}
            assert onnx.helper.tensor_dtype_to_np_dtype(mlp.data_type) == expected
    assert sizes == {
        "fp32": rows * 8 * 4, "fp16": rows * 8 * 2, "int8": rows * (8 + 2), "int4": rows * (4 + 4)
    }  # fmt: skip


def test_row_blocks_and_external_data_give_the_same_answers(tmp_path):
    """The >2 GB path at small scale: forced external data, tables split into row blocks."""
    model = random_model()
    spec = spec_for(model.config)
    inputs = spec.random_inputs(400, np.random.default_rng(2))
    small = LoweringOptions(external_data_bytes=0, max_tensor_elements=8 * 50, block_rows=17)
    for variant in ("fp32", "fp16", "int8"):
        whole = tmp_path / f"{variant}-whole.onnx"
        split = tmp_path / f"{variant}-split" / "model.onnx"
        split.parent.mkdir()
        lower_to_onnx(model, spec, whole, variant)
        lowered = lower_to_onnx(model, spec, split, variant, small)
        assert lowered.external_data and lowered.row_blocks == {"C3": 7}
        assert check_onnx(split, spec) == []
        proto = onnx.load(str(split), load_external_data=False)
        tables = [t for t in proto.graph.initializer if t.name.startswith("table.")]
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in tables)
        assert all(np.prod(t.dims) < 8 * 50 for t in tables)
        offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in tables]
        assert all(o % 4096 == 0 for o in offsets)
        assert {e.value for t in tables for e in t.external_data if e.key == "location"} == {
            "model.onnx.data"
        }
        expected = ort.InferenceSession(str(whole)).run(None, inputs)[0]
        got = ort.InferenceSession(str(split)).run(None, inputs)[0]
        np.testing.assert_array_equal(got, expected)


def test_exporter_writes_a_model_per_variant(tiny_runs, tmp_path):
    variants = ("fp32", "fp16", "int8", "int4")
    config = ExportConfig(name="m", max_batch_size=512, variants=variants)
    report = export_variants(tiny_runs["mlet"], tmp_path, config)
    assert [r.name for r in report.results] == ["m", "m-fp16", "m-int8", "m-int4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-fp16", "m-int4", "m-int8"]
    fp32_tables = None
    for result in report.results:
        manifest = json.loads((result.path / "manifest.json").read_text())
        variant = manifest["variant"]
        assert manifest["platform"] == "onnxruntime_onnx"
        assert manifest["model_file"] == "1/model.onnx"
        assert manifest["model_bytes"] == (result.path / "1" / "model.onnx").stat().st_size
        spec = ExportSpec.from_dict(manifest["spec"])  # what the server reads
        assert spec.input_names == ["dense", "sparse"] and spec.max_batch_size == 512
        parity = manifest["parity"]
        assert parity["onnxruntime_providers"][0] == "CPUExecutionProvider"
        assert parity["onnxruntime_max_abs_diff"] <= spec.tolerance
        accuracy = manifest["accuracy"]
        assert accuracy["rows_source"].startswith("test split") and accuracy["rows"] == 400
        assert abs(accuracy["auc_difference"]) <= (0.002 if variant == "int4" else 0.001)
        quantized = variant in ("int8", "int4")
        assert manifest["tensorrt_compatibility"]["compatible"] == (not quantized)
        text = (result.path / "config.pbtxt").read_text()
        assert f'name: "{result.name}"' in text and 'platform: "onnxruntime_onnx"' in text
        table_bytes = manifest["weights"]["table_bytes"]
        if variant == "fp32":
            fp32_tables = table_bytes
            assert accuracy["max_abs_diff"] == 0
        else:
            assert 0 < accuracy["max_abs_diff"] < 0.02
            assert table_bytes < fp32_tables
    again = export_variants(tiny_runs["mlet"], tmp_path, config)
    assert [r.status for r in again.results] == ["unchanged"] * 4


def test_a_variant_failing_its_check_leaves_no_model(tiny_runs, tmp_path):
    # Any AUC change exceeds a negative allowance: the int8 check fails, so nothing is kept,
    # not even the fp32 model that passed.
    config = ExportConfig(name="m", variants=("fp32", "int8"), max_auc_loss=-1.0)
    with pytest.raises(ExportError, match="m-int8: loses"):
        export_variants(tiny_runs["full"], tmp_path, config)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_nothing_half_written(tiny_runs, tmp_path, monkeypatch):
    export_variants(tiny_runs["full"], tmp_path, ExportConfig(name="m"))
    before = sorted(p.name for p in tmp_path.iterdir())

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checks, "accuracy_problems", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_variants(tiny_runs["mlet"], tmp_path, ExportConfig(name="n", variants=("int8",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder left


def test_external_data_export_through_the_repository(tiny_runs, tmp_path):
    config = ExportConfig(name="big", external_data_bytes=0, max_tensor_elements=4 * 40)
    (result,) = export_variants(tiny_runs["mlet"], tmp_path, config).results
    files = result.manifest.files
    assert set(files) == {"1/model.onnx", "1/model.onnx.data", "config.pbtxt"}
    assert result.manifest.weights["row_blocks"] == {"C1": 2, "C3": 4}
    assert (
        result.manifest.model_bytes
        == files["1/model.onnx"]["bytes"] + files["1/model.onnx.data"]["bytes"]
    )
    assert result.manifest.parity["onnxruntime_max_abs_diff"] < 1e-5
    session = ort.InferenceSession(str(result.path / "1" / "model.onnx"))
    spec = result.manifest.spec
    assert session.run(None, spec.random_inputs(3, np.random.default_rng(0)))[0].shape == (3, 1)


def test_unknown_variant_is_refused(tiny_runs, tmp_path):
    with pytest.raises(ValueError, match="variants must be among"):
        export_variants(tiny_runs["full"], tmp_path, ExportConfig(variants=("int2",)))


@pytest.mark.parametrize("dim", [3, 4])
def test_int4_packs_two_codes_a_byte_at_odd_and_even_widths(tmp_path, dim):
    from export.quantize import pack_int4, quantize_rows, unpack_int4

    rows = np.random.default_rng(2).standard_normal((50, dim)).astype(np.float32)
    codes, _, _ = quantize_rows(rows, bits=4)
    assert codes.max() <= 15
    packed = pack_int4(codes)
    assert packed.shape == (50, (dim + 1) // 2)
    np.testing.assert_array_equal(unpack_int4(packed, dim), codes)
    model = DLRM(build_config(num_dense=2, table_sizes=[40, 7], embedding="full", dim=dim,
                              hotness=2)).eval()  # fmt: skip
    spec = spec_for(model.config)
    inputs = spec.random_inputs(200, np.random.default_rng(3))
    lower_to_onnx(model, spec, tmp_path / "m.onnx", "int4")
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, inputs)[0]
    expected = dequantized_copy(model.collapsed(), "int4").probability(
        *(torch.from_numpy(v) for v in inputs.values())
    )
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-6)


def test_int8_mlp_bench_reads_the_float16_stored_weights_as_initializers(tmp_path):
    from bench.inprocess.export_bench import with_float32_mlp_weights

    model = random_model()
    spec = spec_for(model.config)
    inputs = spec.random_inputs(100, np.random.default_rng(4))
    lower_to_onnx(model, spec, tmp_path / "int8.onnx", "int8")
    wide = with_float32_mlp_weights(onnx.load(str(tmp_path / "int8.onnx")))
    weights = {t.name for t in wide.graph.initializer}
    matmuls = [n for n in wide.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(matmuls) == 5 and not any(
        n.op_type == "Cast" and n.input[0].startswith(("bottom.", "top.")) for n in wide.graph.node
    )
    onnx.save(wide, str(tmp_path / "wide.onnx"))
    before = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, inputs)[0]
    after = ort.InferenceSession(str(tmp_path / "wide.onnx")).run(None, inputs)[0]
    np.testing.assert_allclose(after, before, atol=1e-7)
