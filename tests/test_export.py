import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.checks import FORBIDDEN_OPS, ExportError, check_onnx
from export.exporter import ExportConfig
from mlet.dlrm import DLRM, build_config
from mlet.run import load_run
from mlet.spec import spec_for
from tests.helpers import export_run, lower_to_onnx


def test_exported_model_folder_layout_and_manifest(tiny_repo, tiny_runs):
    folder = tiny_repo / "mlet"
    assert (folder / "config.pbtxt").is_file() and (folder / "1" / "model.onnx").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source_run"] == str(tiny_runs["mlet"].resolve())
    assert manifest["opset"] == 18 and manifest["variant"] == "fp32"
    parity = manifest["parity"]
    assert parity["collapse_max_abs_diff"] < 1e-5
    assert parity["onnxruntime_max_abs_diff"] < 1e-5
    assert parity["rows_source"].startswith("test split")
    entry = manifest["files"]["1/model.onnx"]
    assert entry["bytes"] == (folder / "1" / "model.onnx").stat().st_size
    assert len(entry["sha256"]) == 64
    assert manifest["model"]["embedding_bytes_inference"] == 4 * 4 * (50 + 7 + 120 + 3 + 30)


def test_config_pbtxt_contents(tiny_repo):
    text = (tiny_repo / "mlet" / "config.pbtxt").read_text()
    for expected in [
        'name: "mlet"',
        'platform: "onnxruntime_onnx"',
        "max_batch_size: 512",
        'name: "dense"\n    data_type: TYPE_FP32\n    dims: [ 13 ]',
        'name: "sparse"\n    data_type: TYPE_INT64\n    dims: [ 5 ]',
        'name: "probability"\n    data_type: TYPE_FP32\n    dims: [ 1 ]',
        "preferred_batch_size: [ 64, 256 ]",
        "kind: KIND_CPU",
    ]:
        assert expected in text


def test_onnx_graph_uses_plain_gather_and_dynamic_batch(tiny_repo):
    model = onnx.load(str(tiny_repo / "mlet" / "1" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Gather" in ops and not ops & FORBIDDEN_OPS
    tables = [i for i in model.graph.initializer if i.name.startswith("table.")]
    assert len(tables) == 5 and all(t.dims[1] == 4 for t in tables)  # collapsed to d=4
    session = ort.InferenceSession(str(tiny_repo / "mlet" / "1" / "model.onnx"))
    run = load_run(json.loads((tiny_repo / "mlet" / "manifest.json").read_text())["source_run"])
    spec = spec_for(run.model_config)
    trained = run.load_model()  # the uncollapsed multi-layer model, as trained
    for batch in (1, 3, 512):
        inputs = spec.random_inputs(batch, np.random.default_rng(batch))
        out = session.run(None, inputs)[0]
        with torch.no_grad():
            expected = trained.probability(*(torch.from_numpy(v) for v in inputs.values()))
        assert out.shape == (batch, 1)
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def test_reexport_is_unchanged_and_a_different_model_is_refused(tiny_repo, tiny_runs):
    result = export_run(tiny_runs["mlet"], tiny_repo, ExportConfig(name="mlet", max_batch_size=512))
    assert result.status == "unchanged"
    before = (tiny_repo / "full" / "1" / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="different model"):
        export_run(tiny_runs["mlet"], tiny_repo, ExportConfig(name="full", max_batch_size=512))
    assert (tiny_repo / "full" / "1" / "model.onnx").read_bytes() == before
    assert not [p for p in tiny_repo.iterdir() if p.name.startswith(".")]


def test_replace_swaps_a_model(tiny_runs, tmp_path):
    export_run(tiny_runs["full"], tmp_path, ExportConfig(name="m"))
    result = export_run(tiny_runs["mlet"], tmp_path, ExportConfig(name="m", replace=True))
    assert result.status == "replaced"
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["model"]["embedding"] == "mlet"


def test_failed_check_leaves_no_model(tiny_runs, tmp_path, monkeypatch):
    import export.checks as checks

    monkeypatch.setattr(checks, "check_onnx", lambda path, spec: ["graph is wrong"])
    with pytest.raises(ExportError, match="graph is wrong"):
        export_run(tiny_runs["full"], tmp_path, ExportConfig(name="m"))
    assert list(tmp_path.iterdir()) == []


def test_bad_model_name_is_refused(tiny_runs, tmp_path):
    with pytest.raises(ValueError, match="model name"):
        export_run(tiny_runs["full"], tmp_path, ExportConfig(name="../escape"))


def test_multi_hot_model_exports_with_three_dimensional_ids(tmp_path):
    torch.manual_seed(0)
    model = DLRM(build_config(3, [10, 20], "full", dim=4, hotness=2), sparse=False).eval()
    spec = spec_for(model.config)
    assert spec.inputs[1].shape == (2, 2)
    path = tmp_path / "m.onnx"
    lower_to_onnx(model, spec, path)
    assert check_onnx(path, spec) == []
    inputs = spec.random_inputs(6, np.random.default_rng(0))
    expected = model.probability(*(torch.from_numpy(v) for v in inputs.values())).detach().numpy()
    got = ort.InferenceSession(str(path)).run(None, inputs)[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_check_onnx_reports_forbidden_ops(tmp_path):
    model = DLRM(build_config(3, [10, 20], "full", dim=4), sparse=False).eval()
    spec = spec_for(model.config)
    path = tmp_path / "m.onnx"
    lower_to_onnx(model, spec, path)
    graph = onnx.load(str(path))
    graph.graph.node.append(onnx.helper.make_node("SequenceEmpty", [], ["unused_sequence"]))
    onnx.save(graph, str(path))
    problems = check_onnx(path, spec)
    assert any("SequenceEmpty" in p for p in problems)
