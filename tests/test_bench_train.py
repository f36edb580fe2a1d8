"""`mlet bench train --quick`: the step timings, the loop speed and the resume check."""

from cli import main
from mlet.files import read_json


def test_bench_train_quick_reports_speed_and_resume(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", "train", "--quick", "--baseline", "", "--steps", "4", "--rounds", "1",
            "--out", str(out), "--work", str(work)]  # fmt: skip
    assert main(argv) == 0
    results = read_json(out / "train.json")
    new = results["torchrec"]
    assert new["full_ms"] > 0 and new["mlet_ms"] > 0 and new["full_steps_per_s"] > 0
    assert results["mlet_over_full"] == new["mlet_ms"] / new["full_ms"]
    assert "baseline" not in results and "memory" not in results
    assert results["resume"]["identical_weights"] is True
    assert results["resume"]["killed_after"].startswith("step-")
    assert "byte-identical" in (out / "train.md").read_text()
    assert "| TorchRec (this checkout) |" in capsys.readouterr().out
