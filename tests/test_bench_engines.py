"""`mlet bench engines` end to end, short: both engines, the same loads, every figure there."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load.engines import EnginesConfig, run_engines, wrk_missing_reason
from bench.load.load_test import LoadConfig, run_load
from bench.load.servers import Engine, running_engine
from mlet.files import read_json
from serve.triton_engine import unavailable_reason

TRITON = unavailable_reason()


def test_bench_engines_short_run(tiny_repo, tmp_path):
    engines = ("mlet",) if TRITON else ("mlet", "triton")
    config = EnginesConfig(engines=engines, duration=2, connections=4, pool=8, rounds=2)
    run_engines(tiny_repo, "mlet", config, tmp_path)
    summary = read_json(tmp_path / "engines.json")
    results = summary["results"]
    assert [(r["engine"], r["rows_per_request"], r["encoding"]) for r in results] == [
        *((e, 1, "JSON") for e in (*engines, "mlet, batching off")),
        *((e, 256, "binary") for e in engines),
    ]
    for r in results:
        assert r["requests"] > 0 and r["failures"] == 0, r
        assert [x["round"] for x in r["rounds"]] == [1, 2]  # the engines alternate
        assert r["requests"] == sum(x["requests"] for x in r["rounds"])
        assert r["rows_per_s"] == pytest.approx(r["requests_per_s"] * r["rows_per_request"])
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["server_cpu_cores"] > 0 and r["client_cpu_cores"] > 0
        assert r["server_rss_bytes"] > 0
        assert r["generator"] == ("locust" if wrk_missing_reason() else "wrk")
    table = (tmp_path / "engines.md").read_text()
    assert all(f"| {e} | 1-row JSON |" in table for e in engines)
    # the goals of one run: ratios of figures measured side by side, and the ceiling
    ceiling, goals = summary["inprocess"], summary["goals"]
    assert ceiling["batch"] == 256 and ceiling["rows_per_s"] > 0
    runs = ceiling["runs"]  # timed just before and just after each round of our batched load
    assert len(runs) == 4
    assert ceiling["rows_per_s"] == pytest.approx(sum(r["rows_per_s"] for r in runs) / 4)
    ours = {(r["engine"], r["rows_per_request"]): r for r in results}
    assert goals["requests_batching_on_over_off_1row"] == pytest.approx(
        ours[("mlet", 1)]["requests_per_s"] / ours[("mlet, batching off", 1)]["requests_per_s"]
    )
    assert goals["rows_ours_over_inprocess_batched"] == pytest.approx(
        ours[("mlet", 256)]["rows_per_s"] / ceiling["rows_per_s"]
    )
    assert "batched rows/s, ours / in-process ONNX Runtime (goal >= 0.8)" in table
    if TRITON:
        pytest.skip(f"Triton half not run: {TRITON}")
    assert "successfully loaded 'mlet'" in (tmp_path / "triton.log").read_text()


def test_bench_load_against_a_running_server_by_url(tiny_repo, tmp_path):
    with running_engine(Engine(), tiny_repo, ["mlet"]) as (url, _):
        config = LoadConfig(users=2, duration=2, engine=Engine(name="url", url=url))
        (summary,) = run_load(tiny_repo, ["mlet"], config, tmp_path)
    assert summary["engine"] == f"server at {url}" and summary["failures"] == 0
    assert summary["requests"] > 0
    assert f"Engine: server at {url}." in Path(tmp_path / "summary.md").read_text()


@pytest.mark.skipif(TRITON is not None, reason=f"no Triton here: {TRITON}")
def test_bench_load_engine_triton(tiny_repo, tmp_path):
    config = LoadConfig(users=2, duration=2, binary=True, engine=Engine(name="triton"))
    (summary,) = run_load(tiny_repo, ["mlet"], config, tmp_path)
    assert summary["engine"] == "Triton Inference Server"
    assert summary["failures"] == 0 and summary["requests"] > 0


def test_bench_engines_with_locust_processes(tiny_repo, tmp_path):
    """The generator where wrk is missing: several Locust processes, the same figures."""
    config = EnginesConfig(
        engines=("mlet",), duration=2, connections=4, loads=((1, False),), generator="locust",
        batching_off=False, rounds=1,
    )  # fmt: skip
    (result,) = run_engines(tiny_repo, "mlet", config, tmp_path)["results"]
    assert result["generator"] == "locust" and result["failures"] == 0
    assert result["requests"] > 0 and result["client_cpu_cores"] > 0
