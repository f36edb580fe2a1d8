"""The benchmark report: built from a stored results folder, rendered in headless Chromium."""

import json
import shutil
from pathlib import Path

import pytest

from bench.inprocess.micro import MicroConfig
from bench.load.sweep import RequestKind, SweepConfig
from bench.report.compare import CompareConfig, run_comparison, study_lines
from bench.report.report import (
    build_report,
    headline,
    limiting_side,
    load_results,
    mapped_pages_cell,
)

FIXTURE = Path(__file__).parent / "fixtures" / "bench-results"
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture()
def results(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_headline_ratios_against_the_baseline(results):
    figures = {f["model"]: f for f in headline(load_results(results))}
    base, small = figures["full-d16"], figures["mlet-d4-k64"]
    assert base["bytes_reduction"] == 1.0 and base["auc_difference"] == 0.0
    assert small["bytes_reduction"] == 4.0  # 1,308,608 / 327,152 embedding bytes
    assert small["file_reduction"] == pytest.approx(1_551_926 / 564_254)
    # the fixture's medians: p99 14 ms against 16 ms at the reference step, the highest
    # 1-row requests/s 1,735.4 against 1,886.7, the highest rows/s 104,319.7 against 99,201.9
    assert small["p99_ratio"] == pytest.approx(0.875)
    assert small["throughput_ratio"] == pytest.approx(1735.408745980738 / 1886.7125338184537)
    assert small["rows_ratio"] == pytest.approx(104319.7487372485 / 99201.86847391354)
    assert small["auc_difference"] == pytest.approx(0.7755213753215955 - 0.7729557813036447)


def test_report_files_and_first_screen(results):
    md, page = build_report(results)
    text = md.read_text()
    assert text.startswith("# Benchmark report: compressed against baseline (full-d16)")
    first_screen = text.split("## Headline")[0]
    assert "embeddings 4.0x smaller" in first_screen and "test AUC" in first_screen
    assert "| mlet-d4-k64 | compressed | 327,152 | 4.00x |" in text
    for plot in ("latency_throughput", "memory", "accuracy_bytes", "micro_latency"):
        assert (results / "plots" / f"{plot}.png").stat().st_size > 1000
    assert "Commit:" in text and "Command:" in text
    assert "## What limited the highest throughput" in text
    assert 'src="data:image/png;base64,' in page.read_text()


def test_weights_inside_the_model_file_are_not_reported_as_mapped_pages():
    figure = {"median": 3 * 2**20, "spread": 0.0, "noisy": False}
    inline = {"mapped_model_files": [], "mapped_model_resident_bytes": figure}
    external = {"mapped_model_files": ["model.onnx.data"], "mapped_model_resident_bytes": figure}
    assert mapped_pages_cell(inline) == "none mapped"
    assert mapped_pages_cell(external).startswith("3.00")


def test_the_side_that_limited_a_load_step():
    def step(client: float, server: float) -> dict:
        return {"client_cpu_cores": {"median": client}, "server_cpu_cores": {"median": server}}

    assert limiting_side(step(0.9, 0.8), cores=2, locust_processes=1).startswith("load generator")
    assert limiting_side(step(0.9, 0.8), cores=4, locust_processes=2).startswith("neither")
    assert limiting_side(step(0.4, 1.4), cores=2, locust_processes=1).startswith("the machine")
    assert limiting_side(step(0.3, 1.0), cores=2, locust_processes=1).startswith("neither")


def test_missing_results_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a benchmark results folder"):
        build_report(tmp_path)


@pytest.mark.skipif(
    not (CHROMIUM.exists() and DRIVER.exists()),
    reason="Debian's chromium and chromium-driver are not installed (make test installs them)",
)
def test_html_report_renders_in_headless_chromium(results, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, page = build_report(results)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        assert driver.title.startswith("Benchmark report")
        images = driver.execute_script(
            "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        assert len(images) == 4
        assert all(complete and width > 0 for _, complete, width in images), images
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#headline tbody tr')]"
            ".map(r => r.cells[0].textContent)"
        )
        assert rows == ["full-d16", "mlet-d4-k64"]
        headline_top = driver.execute_script(
            "return document.getElementById('headline').getBoundingClientRect().top"
        )
        assert headline_top < 1000  # the headline table is on the first screen
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()


def test_short_comparison_end_to_end(tiny_repo, tmp_path):
    config = CompareConfig(
        micro=MicroConfig(batch_sizes=(1, 16), min_iterations=5, min_seconds=0.05, repetitions=1),
        sweep=SweepConfig(
            kinds=(
                RequestKind("1-row JSON", 1, False, (1, 2)),
                RequestKind("32-row binary", 32, True, (1,)),
            ),
            duration=2,
            repetitions=1,
        ),
        roles={"full": "baseline", "mlet": "compressed"},
    )
    page = run_comparison(tiny_repo, ["full", "mlet"], config, tmp_path / "out")
    assert page.is_file()
    results = load_results(tmp_path / "out")
    for model in results.sweep:
        for curve in model["curves"].values():
            assert all(step["failures"] == 0 for step in curve)
            assert all(step["requests_per_s"]["median"] > 0 for step in curve)
    assert {m["name"] for m in results.micro} == {"full", "mlet"}
    environment = results.environment
    assert environment["machine"]["logical_cores"] >= 1 and environment["versions"]["onnxruntime"]


def study_group(method, dim, hidden, val_auc, test_auc, regime="one-pass"):
    return {"regime": regime, "method": method, "dim": dim, "hidden": hidden, "val_auc": val_auc,
            "test_auc": test_auc, "test_auc_std": 0.001, "embedding_bytes": 100 * dim}  # fmt: skip


def test_study_lines_keep_the_best_inner_width_per_dim(tmp_path, results):
    groups = [
        study_group("full", 2, None, 0.70, 0.71),
        study_group("full", 4, None, 0.72, 0.73),
        study_group("mlet", 2, 16, 0.74, 0.75),
        study_group("mlet", 2, 64, 0.76, 0.74),  # best validation AUC: this k is kept
        study_group("full", 2, None, 0.9, 0.9, regime="tuned"),
    ]
    (tmp_path / "summary.json").write_text(json.dumps({"groups": groups, "verdicts": {}}))
    lines = {line["label"]: line for line in study_lines(tmp_path)}
    assert lines["full (one-pass)"]["auc_mean"] == [0.71, 0.73]
    assert lines["mlet (one-pass)"]["auc_mean"] == [0.74] and lines["mlet (one-pass)"]["dims"] == [
        2
    ]
    (results / "study.json").write_text(json.dumps(list(lines.values())))
    build_report(results)
    assert (results / "plots" / "accuracy_bytes.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="not a study folder"):
        study_lines(tmp_path / "missing")
