import json
from dataclasses import replace

import pytest

from bench.load.load_test import LoadConfig, run_load, warm_up
from bench.load.serve_bench import ServeBenchConfig, run_serve_bench
from mlet.repository import open_model
from serve.process import running_server


def test_five_second_headless_locust_run_has_no_failures(tiny_repo, tmp_path):
    config = LoadConfig(users=4, duration=5)
    summaries = run_load(tiny_repo, ["mlet"], config, tmp_path)
    (summary,) = summaries
    assert summary["model"] == "mlet"
    assert summary["requests"] > 0 and summary["failures"] == 0
    # the server's own metrics saw the load: batches ran, each of at least one row
    assert summary["server_batch_rows"] >= 1 and summary["server_compute_ms"] > 0
    assert summary["server_rss_bytes"] > 0
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["models"][0]["requests"] == summary["requests"]
    assert "| mlet |" in (tmp_path / "summary.md").read_text()


def test_binary_multi_row_load_has_no_failures(tiny_repo, tmp_path):
    (summary,) = run_load(
        tiny_repo, ["full"], LoadConfig(users=2, duration=2, rows=64, binary=True), tmp_path
    )
    assert summary["requests"] > 0 and summary["failures"] == 0
    # every request reached the server whole: no batch held fewer than one request's rows
    assert summary["server_batch_rows"] >= 64


def test_serve_bench_runs_every_comparison(tiny_repo, tmp_path):
    config = ServeBenchConfig(
        small_users=4, large_rows=32, large_users=2, duration=2, repetitions=1
    )
    report = run_serve_bench(tiny_repo, "mlet", config, tmp_path)
    summary = report["summary"]
    assert summary["failures"] == 0
    assert summary["batching_speedup"] > 0 and summary["binary_fraction_of_inprocess"] > 0
    assert summary["inprocess_rows_per_s"]["values"][0] > 0
    text = (tmp_path / "serve.md").read_text()
    assert "Batching on / off" in text and "server, binary tensors" in text


def test_warm_up_names_the_server_reply_when_a_request_fails(tiny_repo):
    spec = open_model(tiny_repo / "mlet").manifest.spec
    with running_server(tiny_repo, ["mlet"]) as (url, _):
        warm_up(url, "mlet", spec, LoadConfig(rows=3, binary=True))
        with pytest.raises(RuntimeError, match="warm-up request to model 'full' .* HTTP 404"):
            warm_up(url, "full", spec, LoadConfig())  # a model this server does not load


def test_a_sweep_over_grpc_steps_its_users_without_failures(tiny_repo, tmp_path):
    from bench.load.sweep import SweepConfig, request_kinds, run_sweep

    kinds = tuple(replace(kind, users=(1, 2)) for kind in request_kinds("grpc"))
    config = SweepConfig(kinds=kinds, duration=2, repetitions=1, protocol="grpc",
                         saturation_gain=-1.0)  # fmt: skip
    (summary,) = run_sweep(tiny_repo, ["mlet"], config, tmp_path)
    assert summary["protocol"] == "grpc" and summary["called"] == "mlet"
    assert list(summary["curves"]) == ["1-row gRPC", "256-row gRPC"]
    for steps in summary["curves"].values():
        assert [s["users"] for s in steps] == [1, 2]
        assert all(s["failures"] == 0 and s["requests_per_s"]["median"] > 0 for s in steps)


def test_serve_bench_over_grpc_compares_batching_and_the_in_process_rate(tiny_repo, tmp_path):
    config = ServeBenchConfig(small_users=4, large_rows=32, large_users=2, duration=2,
                              repetitions=1, protocol="grpc")  # fmt: skip
    summary = run_serve_bench(tiny_repo, "mlet", config, tmp_path)["summary"]
    assert summary["failures"] == 0 and summary["batching_speedup"] > 0
    assert summary["binary_fraction_of_inprocess"] > 0
    text = (tmp_path / "serve.md").read_text()
    assert "## 1-row gRPC requests" in text and "server, gRPC" in text
    assert "server, JSON" not in text
