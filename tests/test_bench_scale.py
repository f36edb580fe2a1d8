"""`mlet bench scale --quick`: the same code as the Kaggle-size run on tables 100x smaller."""

from __future__ import annotations

import numpy as np
import pytest

from bench.load.engines import wrk_missing_reason
from bench.load.ids import (
    EmpiricalSampler,
    fit_zipf_exponent,
    id_samplers,
    replayed_samplers,
    table_counts,
)
from bench.load.scale import (
    MODELS,
    SCALE_KEYS,
    ScaleConfig,
    check_resources,
    needs,
    quick_config,
    run_scale,
)
from bench.report.scale_report import scale_goals
from mlet.files import read_json
from mlet.zipf import ZipfSampler
from serve.triton_engine import unavailable_reason

TRITON = unavailable_reason()
WRK = wrk_missing_reason()
VARIANTS = ("full-d64", "mlet-d16-k64", "mlet-d16-k64-int4")


@pytest.fixture(scope="module")
def quick_run(tiny_data, tmp_path_factory):
    if WRK:
        pytest.skip(f"mlet bench scale needs wrk: {WRK}")
    work, out = tmp_path_factory.mktemp("scale-work"), tmp_path_factory.mktemp("scale-out")
    engines = ("mlet",) if TRITON else ("mlet", "triton")
    config = quick_config(
        work=work, engines=engines, variants=VARIANTS, seconds=1.0,
        ids=("uniform", "zipf", "dataset"), zipf_from=tiny_data, ids_from=tiny_data,
    )  # fmt: skip
    rows = run_scale(config, out)
    return config, rows, out


def test_quick_scale_writes_a_row_per_engine_model_ids_and_request_size(quick_run):
    config, rows, out = quick_run
    written = read_json(out / "scale.json")
    assert written == [{key: row[key] for key in SCALE_KEYS} for row in rows]
    assert all(list(row) == list(SCALE_KEYS) for row in written)
    expected = [(e, v, i, n) for v in VARIANTS for e in config.engines
                for i in ("uniform", "zipf", "dataset") for n in (1, 256)]  # fmt: skip
    assert [(r["engine"], r["variant"], r["ids"], r["rows_per_request"]) for r in written] == (
        expected
    )
    for row in written:
        assert row["requests_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"]
        assert row["rows_per_s"] == pytest.approx(row["requests_per_s"] * row["rows_per_request"])
        assert row["ready_s"] > 0 and row["rss_bytes"] <= row["peak_rss_bytes"]
    details = read_json(out / "scale-details.json")
    assert all(load["failures"] == 0 for s in details["served"] for load in s["loads"])
    assert details["zipf"]["source"] == "fitted" and details["zipf"]["exponent"] > 0
    assert set(details["builds"]) == {"full-d64", "mlet-d16-k64"}
    assert all(b["steps"] > 0 and not b["reused"] for b in details["builds"].values())
    for name in (
        "scale.md",
        "scale.html",
        "plots/scale-memory_p99.png",
        "plots/scale-throughput.png",
    ):
        assert (out / name).stat().st_size > 0


def test_the_uniform_warm_up_makes_every_table_resident(quick_run):
    """After touching every row, the model's mapped data file is resident in the server
    (what model_resident_bytes measures), and each model's share follows its table bytes."""
    config, rows, _ = quick_run
    repo = config.work / "models"
    for row in rows:
        data_file = repo / row["variant"] / "1" / "model.onnx.data"
        assert row["model_resident_bytes"] >= 0.95 * data_file.stat().st_size, row
        assert row["model_resident_bytes"] <= row["disk_bytes"] * (
            1 if row["engine"] == "mlet" else 2  # Triton: the stub and the server may map it
        )
    by = {(r["engine"], r["variant"]): r["model_resident_bytes"] for r in rows}
    for engine in config.engines:
        assert by[(engine, "mlet-d16-k64")] / by[(engine, "full-d64")] == pytest.approx(
            0.25, abs=0.01
        )
        assert by[(engine, "mlet-d16-k64-int4")] < by[(engine, "mlet-d16-k64")] / 4


def test_goals_are_ratios_of_the_run(quick_run):
    _, rows, out = quick_run
    goals = {g["goal"]: g for g in scale_goals(rows, read_json(out / "scale-details.json"))}
    small = next(r for r in rows if r["engine"] == "mlet" and r["variant"] == "mlet-d16-k64")
    large = next(r for r in rows if r["engine"] == "mlet" and r["variant"] == "full-d64")
    resident = goals["mlet: model resident bytes, mlet-d16-k64 / full-d64"]
    assert resident["value"] == small["model_resident_bytes"] / large["model_resident_bytes"]
    assert resident["met"] == (resident["value"] <= 0.26)
    assert goals["bytes on disk, mlet-d16-k64-int8 / mlet-d16-k64-fp16"]["value"] is None
    assert "| mlet: Zipf 256-row p99, mlet-d16-k64 / full-d64 |" in (out / "scale.md").read_text()


def test_a_second_run_reuses_the_models(quick_run, tmp_path):
    config, _, _ = quick_run
    again = quick_config(work=config.work, engines=("mlet",), variants=("mlet-d16-k64-int4",),
                         seconds=1.0, ids=("zipf",), rows_per_request=(1,))  # fmt: skip
    rows = run_scale(again, tmp_path)
    assert [(r["variant"], r["ids"], r["rows_per_request"]) for r in rows] == [
        ("mlet-d16-k64-int4", "zipf", 1)
    ]
    assert read_json(tmp_path / "scale-details.json")["builds"]["mlet-d16-k64"]["reused"]


def test_a_run_that_does_not_fit_is_refused_with_the_figure(tmp_path):
    need = needs(ScaleConfig())  # the Kaggle-size run, every model
    assert need["memory_step"] == "training full-d64"
    assert need["memory_bytes"] > 4 * 26 * 10**6 * 64  # at least full d=64's 8.6 GB of tables
    with pytest.raises(MemoryError, match=r"needs about 10\.\d GiB of memory .*training full-d64"):
        check_resources(need, 8 << 30, 1 << 40, tmp_path)
    with pytest.raises(OSError, match=r"GiB of disk in .*--work"):
        check_resources(need, 1 << 40, 1 << 30, tmp_path)
    check_resources(need, 1 << 40, 1 << 40, tmp_path)
    int4 = needs(ScaleConfig(variants=("mlet-d16-k64-int4",)))  # MLET trains at k=64
    assert int4["memory_step"] == "training mlet-d16-k64"
    assert int4["memory_bytes"] == pytest.approx(need["memory_bytes"], rel=0.01)
    assert needs(ScaleConfig(variants=("full-d16",)))["memory_bytes"] < need["memory_bytes"] / 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variants": ("full-d32",)}, "variants must be among"),
        ({"engines": ("torchserve",)}, "engines must be among"),
        ({"ids": ("dataset",)}, "dataset ids need --ids-from"),
        ({"ids": ("skewed",)}, "ids must be among"),
        ({"seconds": 0.5}, "seconds must be >= 1"),
    ],
)
def test_bad_options_name_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        ScaleConfig(**options)


def test_the_models_are_the_issues_names():
    assert list(MODELS) == ["full-d64", "full-d16", "mlet-d16-k64", "mlet-d16-k64-fp16",
                            "mlet-d16-k64-int8", "mlet-d16-k64-int4"]  # fmt: skip


def test_the_zipf_fit_recovers_the_exponent_it_was_drawn_with():
    rng = np.random.default_rng(0)
    for exponent in (0.6, 1.1):
        ids = ZipfSampler(5000, exponent, rng).sample(400_000, rng)
        fitted = fit_zipf_exponent(np.bincount(ids, minlength=5000))
        assert fitted == pytest.approx(exponent, abs=0.03)
    with pytest.raises(ValueError, match="two distinct ids"):
        fit_zipf_exponent(np.array([0, 5, 0]))


def test_dataset_ids_replay_the_logged_frequencies(tiny_data):
    counts, _, sizes = table_counts(tiny_data)
    rng = np.random.default_rng(0)
    samplers, note = replayed_samplers(tiny_data, sizes, rng)
    assert "as logged" in note
    drawn = samplers[2].sample(200_000, rng)
    expected = counts[2] / counts[2].sum()
    assert np.abs(np.bincount(drawn, minlength=sizes[2]) / 200_000 - expected).max() < 0.01
    # other tables: each table's frequency profile, by rank, onto random ids of the model's
    samplers, note = replayed_samplers(tiny_data, (1000, 10), rng)
    assert "mapped by rank" in note
    drawn = samplers[1].sample(100_000, rng)
    assert drawn.max() < 10
    top = np.sort(counts[1][counts[1] > 0])[::-1][:10]
    shares = np.sort(np.bincount(drawn, minlength=10))[::-1] / 100_000
    assert np.abs(shares[: len(top)] - top / top.sum()).max() < 0.01


def test_uniform_ids_cover_the_table_and_samplers_refuse_nothing_to_draw():
    samplers, _ = id_samplers("uniform", (7, 1000), seed=0)
    drawn = samplers[0].sample(10_000, np.random.default_rng(0))
    assert set(drawn.tolist()) == set(range(7))
    with pytest.raises(ValueError, match="at least one id"):
        EmpiricalSampler(np.array([], dtype=np.int64), np.array([]))
    with pytest.raises(ValueError, match="need an exponent"):
        id_samplers("zipf", (7,), seed=0)
