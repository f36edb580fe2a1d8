"""The large-model path at small scale: block-wise weights files, the export benchmark."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bench.inprocess.export_bench import ExportBenchConfig, run_export_bench, write_random_mlet_run
from export.sources import RunWeights
from mlet.files import write_json
from mlet.run import load_run
from mlet.weights import SafetensorsReader, SafetensorsWriter


def test_writer_streams_blocks_that_safetensors_reads(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1000, 8)).astype(np.float32)
    small = np.arange(5, dtype=np.float32)
    layout = {"small": (np.float32, (5,)), "big": (np.float32, (1000, 8))}
    with SafetensorsWriter(tmp_path / "w.safetensors", layout, {"format": "x"}) as out:
        out.write("small", small)
        for start in range(0, 1000, 300):
            out.write("big", big[start : start + 300])
    with safe_open(tmp_path / "w.safetensors", "np") as f:
        assert f.metadata() == {"format": "x"}
        np.testing.assert_array_equal(f.get_tensor("big"), big)
        np.testing.assert_array_equal(f.get_tensor("small"), small)
    with SafetensorsReader(tmp_path / "w.safetensors") as reader:
        np.testing.assert_array_equal(reader.read_rows("big", 17, 402), big[17:402])
        ids = np.array([0, 1, 2, 9, 500, 501, 999])
        np.testing.assert_array_equal(reader.take_rows("big", ids), big[ids])
        np.testing.assert_array_equal(reader.read("small"), small)
        with pytest.raises(IndexError, match="sorted, unique"):
            reader.take_rows("big", np.array([5, 3]))
        with pytest.raises(IndexError, match="outside big"):
            reader.read_rows("big", 990, 1001)
        with pytest.raises(KeyError, match="no tensor 'other'"):
            reader.read("other")


def test_writer_refuses_out_of_order_and_incomplete_tensors(tmp_path):
    layout = {"a": (np.float32, (4, 2)), "b": (np.float32, (3,))}
    with (
        pytest.raises(ValueError, match="expected rows of 'a', got rows of 'b'"),
        SafetensorsWriter(tmp_path / "x.safetensors", layout) as out,
    ):
        out.write("b", np.zeros(3))
    out = SafetensorsWriter(tmp_path / "y.safetensors", layout)
    out.write("a", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"not written in full: \['a', 'b'\]"):
        out.close()
    (tmp_path / "z.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="header is not valid JSON"):
        SafetensorsReader(tmp_path / "z.safetensors")


def test_random_mlet_run_loads_like_a_trained_one(tmp_path):
    run_path = write_random_mlet_run(tmp_path / "run", (300, 7, 1000), dim=4, hidden=8, seed=1)
    run = load_run(run_path)
    model = run.load_model()  # safetensors' own reader and DLRM's state dict agree
    wide = model.embeddings.tables[2].table.weight
    assert wide.shape == (1000, 8) and wide.abs().max() <= (1 / 1000) ** 0.5
    weights = RunWeights(run)
    np.testing.assert_allclose(
        weights.collapsed_rows(2, 100, 250),
        model.embeddings.tables[2].collapse()[100:250].numpy(),
        rtol=1e-6,
    )
    sparse = np.array([[3, 0, 999], [299, 6, 0], [3, 1, 500]])
    reference, remapped = weights.reference_model(sparse)
    dense = torch.rand(3, 13)
    with torch.no_grad():
        expected = model.probability(dense, torch.from_numpy(sparse))
        got = reference.probability(dense, torch.from_numpy(remapped))
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"table C2 must be in 0\.\.6, got 7\.\.7"):
        weights.reference_model(np.array([[0, 7, 0]]))
    weights.close()


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    run_path = write_random_mlet_run(tmp_path / "run", (30, 7), dim=4, hidden=8)
    config = json.loads((run_path / "config.json").read_text())
    config["model"]["tables"][0]["rows"] = 31
    write_json(run_path / "config.json", config)
    with pytest.raises(ValueError, match=r"table.weight is float32 \[30, 8\], the config implies"):
        RunWeights(load_run(run_path))


def test_export_benchmark_at_small_scale(tmp_path):
    config = ExportBenchConfig(
        work=tmp_path / "work", table_sizes=(500, 3, 2000), variants=("fp32", "int8"), batch=16
    )
    other = tmp_path / "work" / "models" / "kaggle-d4"  # another size's model, to compare with
    other.mkdir(parents=True)
    report = run_export_bench(config, tmp_path / "out")
    assert [p.name for p in (tmp_path / "work" / "models").iterdir()] == ["kaggle-d4"]
    assert not (tmp_path / "work" / "kaggle-mlet-d16-k64").exists()
    assert report["collapsed_fp32_bytes"] == 4 * 16 * 2503
    assert report["export"]["peak_rss_bytes"] > report["export"]["sampled_peak"]["anon"] > 0
    assert set(report["models"]) == {"kaggle", "kaggle-int8"}
    for model in report["models"].values():
        session = model["session"]
        assert session["load_seconds"] > 0 and session["after_warmup"]["rss"] > 0
        assert model["parity"]["onnxruntime_max_abs_diff"] < 1e-5
    text = (tmp_path / "out" / "export.md").read_text()
    assert "`mlet export` wall time" in text and "| kaggle-int8 | int8 |" in text
