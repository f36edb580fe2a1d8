"""`mlet bench data` on a small file: the figures it reports exist and add up."""

import json

from bench.inprocess.data_bench import DataBenchConfig, generate_criteo, run_data_bench
from data.criteo import CriteoConfig, read_chunks


def test_generated_file_is_read_by_the_per_line_reader(tmp_path):
    generate_criteo(tmp_path / "day.tsv", 1000, seed=1)
    labels, dense, sparse = next(read_chunks(tmp_path / "day.tsv", CriteoConfig()))
    assert len(labels) == 1000 and dense.shape == (1000, 13) and sparse.shape == (1000, 26)
    assert 0.15 < labels.mean() < 0.35 and (dense[:, 1] < 0).any()


def test_bench_reports_every_reader_and_file_length(tmp_path):
    results = run_data_bench(
        DataBenchConfig(rows=2000, memory_rows=(2000, 4000), repetitions=2), tmp_path
    )
    assert set(results["speed"]) == {"old", "vocab", "hash"}
    assert all(entry["rows"] == 2000 for entry in results["speed"].values())
    assert all(len(runs) == 2 for runs in results["runs"].values())
    fastest = min(r["seconds"] for r in results["runs"]["old"])
    assert results["speed"]["old"]["seconds"] == fastest
    assert [e["rows"] for e in results["memory"].values()] == [2000, 4000, 2000, 4000]
    assert all(e["peak_bytes"] > 0 for e in results["memory"].values())
    report = (tmp_path / "data.md").read_text()
    assert "| old |" in report and "1.0x" in report and "Terabyte day" in report
    stolen = [r["stolen_seconds"] for runs in results["runs"].values() for r in runs]
    assert all(s is None or s >= 0 for s in stolen) and "- vocab: " in report
    assert json.loads((tmp_path / "data.json").read_text())["file_bytes"] > 0
