import json

import pytest

from cli import main
from demo import DemoConfig, run_demo


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    code = main(
        ["train", "--data", str(tmp_path / "none"), "--dim", "4", "--out", str(tmp_path / "r")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "not a dataset folder" in err and "Traceback" not in err


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", "x", "--table-sizes", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_cli_pipeline_synth_train_export(tmp_path, capsys):
    data, run, repo = tmp_path / "data", tmp_path / "run", tmp_path / "models"
    assert (
        main(["data", "synth", "--out", str(data), "--rows", "2000", "--table-sizes", "20,30"]) == 0
    )
    assert main(["train", "--data", str(data), "--embedding", "mlet", "--dim", "2", "--hidden", "8",
                 "--epochs", "1", "--out", str(run)]) == 0  # fmt: skip
    assert main(["export", str(run), "--repo", str(repo), "--name", "m"]) == 0
    out = capsys.readouterr().out
    assert "written" in out and "collapse max abs diff" in out
    manifest = json.loads((repo / "m" / "manifest.json").read_text())
    assert manifest["model"]["hidden"] == 8


def test_demo_end_to_end_small(tmp_path):
    config = DemoConfig(out=tmp_path / "demo", rows=6000, epochs=1, users=2, duration=2)
    report = run_demo(config)
    text = report.read_text()
    assert "| full-d16 | full | 16 |" in text and "| mlet-d4-k64 | mlet | 4 | 64 |" in text
    assert "mlet-d4-k64 against full-d16:\n- embedding bytes 4.00x smaller" in text
    assert "| full-d4 | full | 4 | - |" in text and "mlet-d4-k64 against full-d4:" in text
    assert "| mlet-d4-k64-int8 | int8 |" in text and "| mlet-d4-k64-fp16 | fp16 |" in text
    assert "| mlet-d4-k64-int4 | int4 |" in text
    # a second run reuses every artifact and writes the same table
    assert run_demo(config) == report
