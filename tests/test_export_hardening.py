"""Export refuses damaged runs with messages that name the fault, and never writes NaN."""

import errno
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import export.exporter as exporter
import export.references as references
from export.exporter import ExportConfig, export_variants
from mlet.integrity import check_finite_weights, record_run_checksums
from mlet.run import WEIGHTS_FILE
from mlet.weights import SafetensorsReader


def copy_run(tiny_runs, tmp_path, kind="mlet"):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[kind], run)
    return run


def set_weight(run, name, index, value, rerecord=True):
    weights = load_file(run / WEIGHTS_FILE)
    weights[name][index] = value
    save_file(weights, run / WEIGHTS_FILE)
    if rerecord:
        record_run_checksums(run, [WEIGHTS_FILE])


def test_runs_record_checksums_and_export_refuses_a_changed_run(tiny_runs, tmp_path):
    assert WEIGHTS_FILE in json.loads((tiny_runs["mlet"] / "checksums.json").read_text())
    run = copy_run(tiny_runs, tmp_path)
    set_weight(run, "top.2.bias", 0, 0.5, rerecord=False)
    with pytest.raises(
        ValueError,
        match=r"run .* is damaged: .*model\.safetensors holds \d+ bytes, checksums\.json says",
    ):
        export_variants(run, tmp_path / "models", ExportConfig(name="m"))
    assert not (tmp_path / "models" / "m").exists()


def test_nan_in_an_mlp_bias_is_refused_naming_the_tensor(tiny_runs, tmp_path):
    """Only tables were checked: a NaN bias gave parity NaN, which passed every tolerance."""
    run = copy_run(tiny_runs, tmp_path)
    set_weight(run, "top.2.bias", 0, np.nan)
    with pytest.raises(ValueError, match=r"tensor top\.2\.bias holds nan at row 0"):
        export_variants(run, tmp_path / "models", ExportConfig(name="m"))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_nan_in_a_table_names_the_table_and_its_row(tiny_runs, tmp_path):
    run = copy_run(tiny_runs, tmp_path)
    set_weight(run, "embeddings.tables.2.table.weight", (1, 3), np.inf)
    tables = json.loads((run / "config.json").read_text())["model"]["tables"]
    third = tables[2]["name"]
    with pytest.raises(ValueError, match=rf"table {third} \(embeddings\.tables\.2\.table\.weight\) "
                       r"holds inf at row 1, column 3"):  # fmt: skip
        export_variants(run, tmp_path / "models", ExportConfig(name="m"))


def test_check_finite_weights_reads_large_tensors_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("mlet.integrity.ROWS_PER_READ", 3)
    weights = {"w": np.zeros((10, 2), np.float32), "ids": np.arange(4, dtype=np.int64)}
    weights["w"][7, 1] = np.nan
    save_file(weights, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="tensor w holds nan at row 7, column 1"):
        check_finite_weights(tmp_path / "w.safetensors")


def test_max_abs_diff_is_infinite_when_either_side_is_nan():
    assert references.max_abs_diff(np.array([np.nan]), np.array([0.0])) == float("inf")


def test_a_full_disk_during_export_names_the_repository(tiny_runs, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "lower_variants", disk_full)
    repo = tmp_path / "models"
    with pytest.raises(OSError, match=rf"No space left on device while writing {repo}"):
        export_variants(tiny_runs["full"], repo, ExportConfig(name="m"))
    assert not any(repo.iterdir())  # the staging folder went too


def write_safetensors(path, header: dict, data: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.parametrize(
    "header, message",
    [
        ({"x": 5}, "tensor x: its header entry is not an object"),
        ({"x": {"dtype": "F32"}}, "tensor x: its header entry lacks \\['shape', 'data_offsets'\\]"),
        ({"x": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}, "shape \\['a'\\]"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "data_offsets \\[0\\]"),
        ({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
        ([1, 2], "header must be a JSON object"),
    ],
)
def test_damaged_safetensors_headers_name_the_fault(tmp_path, header, message):
    """These raised TypeError or KeyError without the file's name."""
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, header, b"\0" * 4)
    with pytest.raises(ValueError, match=message) as error:
        SafetensorsReader(path)
    assert str(path) in str(error.value)
