import json
import os

import numpy as np
import pytest

from study import grid as study_module
from study.findings import summarise, verdict, write_report
from study.grid import Cell, StudyConfig, load_cells, run_study, svd_cells, tuned_seed_cells
from study.table_analysis import (
    bucket_auc,
    effective_rank,
    frequency_buckets,
    low_rank_bytes,
    singular_values,
    truncate_rank,
)


def tiny_study_config(**overrides) -> StudyConfig:
    options = dict(
        full_dims=(2, 4),
        mlet_dims=(2,),
        mlet_hidden=(4,),
        svd_dims=(2,),
        contrast_dims=(2,),
        seeds=(0, 1),
        lrs=(0.01, 0.1),
        max_epochs=2,
        max_rows=None,
        bottom_mlp=(8,),
        top_mlp=(8,),
        batch_size=256,
        progress=False,
    )
    options.update(overrides)
    return StudyConfig(**options)


@pytest.fixture(scope="module")
def tiny_study(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    run_study(tiny_data, out, tiny_study_config())
    return out


def cell_files(out):
    return sorted(p.relative_to(out / "cells") for p in (out / "cells").glob("*/*.json"))


def test_study_runs_every_cell_of_the_grid(tiny_study):
    names = {str(p) for p in cell_files(tiny_study)}
    # one pass: (full d2, d4, mlet d2k4, full-normal d2) x 2 seeds, + SVD d2 x 2 seeds
    one_pass = {n for n in names if n.startswith("one-pass/")}
    assert len(one_pass) == 4 * 2 + 2
    assert "one-pass/mlet-d2-k4-lr0.02-s1.json" in names
    assert "one-pass/svd-d2-lr0.02-s0.json" in names
    # tuned: 4 groups x 2 rates on seed 0, 4 groups x 1 more seed at the chosen rate, SVD
    tuned = {n for n in names if n.startswith("tuned/")}
    assert len(tuned) == 4 * 2 + 4 + 2
    record = json.loads((tiny_study / "cells/tuned/full-d4-lr0.1-s0.json").read_text())
    assert record["cell"]["method"] == "full" and record["metrics"]["epochs_run"] >= 1
    assert set(record["bucket_auc"]) == {"rare", "middle", "frequent"}
    assert len(record["spectra"]) == 5  # one per table
    assert (tiny_study / "weights/tuned/full-d4-lr0.1-s0.safetensors").is_file()


def test_tuned_seeds_use_the_rate_with_the_best_validation_auc(tiny_study):
    config = tiny_study_config()
    for cell in tuned_seed_cells(config, tiny_study):
        sweep = {
            lr: json.loads(
                Cell("tuned", cell.method, cell.dim, cell.hidden, lr, 0)
                .path(tiny_study)
                .read_text()
            )
            for lr in config.lrs
        }
        best = max(sweep, key=lambda lr: sweep[lr]["metrics"]["val"]["auc"])
        assert cell.lr == best and cell.seed == 1


def test_rerun_skips_finished_cells_and_resumes_missing_ones(tiny_study, tiny_data, monkeypatch):
    config = tiny_study_config()
    stamps = {p: (tiny_study / "cells" / p).stat().st_mtime_ns for p in cell_files(tiny_study)}
    removed = tiny_study / "cells/one-pass/full-d2-lr0.02-s1.json"
    removed.unlink()
    trained = []
    original = study_module.run_cell

    def counting_run_cell(data, cell, config, out):
        trained.append(cell.name)
        return original(data, cell, config, out)

    monkeypatch.setattr(study_module, "run_cell", counting_run_cell)
    run_study(tiny_data, tiny_study, config)
    assert trained == ["full-d2-lr0.02-s1"]
    assert removed.is_file()
    for path, stamp in stamps.items():
        if tiny_study / "cells" / path != removed:
            assert (tiny_study / "cells" / path).stat().st_mtime_ns == stamp


def test_study_refuses_a_folder_made_with_other_training_settings(tiny_study, tiny_data):
    with pytest.raises(ValueError, match="other training settings"):
        run_study(tiny_data, tiny_study, tiny_study_config(max_epochs=3))


def test_interrupted_cell_leaves_no_result(tiny_data, tmp_path, monkeypatch):
    def broken_train(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_module, "train_model", broken_train)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_data, tmp_path / "s", tiny_study_config(regimes=("one-pass",)))
    assert not list((tmp_path / "s").rglob("*.json.tmp"))
    assert not (tmp_path / "s" / "cells").exists() or not load_cells(tmp_path / "s")


def test_svd_cells_follow_the_widest_full_models_chosen_rate(tiny_study):
    config = tiny_study_config()
    one_pass = svd_cells(config, "one-pass", tiny_study)
    assert [(c.dim, c.lr, c.seed) for c in one_pass] == [(2, 0.02, 0), (2, 0.02, 1)]
    tuned = svd_cells(config, "tuned", tiny_study)
    seed_one = Cell("tuned", "full", 4, None, tuned[0].lr, 1)
    assert seed_one.path(tiny_study).is_file()  # the source model exists at that rate


def test_report_holds_tables_verdicts_and_plots(tiny_study):
    report = write_report(tiny_study, "tiny")
    text = report.read_text()
    assert "## one-pass" in text and "## tuned" in text
    assert "| mlet | 2 | 4 |" in text
    for name in ("auc-vs-bytes-one-pass.png", "auc-vs-bytes-tuned.png", "rank.png"):
        assert (tiny_study / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tiny_study / "summary.json").read_text())
    assert set(summary["verdicts"]) == {"one-pass", "tuned"}


def test_summary_keeps_only_the_chosen_rate():
    def record(method, dim, lr, seed, val, test):
        return {
            "cell": {
                "regime": "tuned",
                "method": method,
                "dim": dim,
                "hidden": None,
                "lr": lr,
                "seed": seed,
            },
            "metrics": {
                "val": {"auc": val},
                "test": {"auc": test},
                "best_epoch": 2,
                "epochs_run": 3,
            },
            "embedding_bytes": dim * 4,
            "bucket_auc": {b: {"auc": test, "rows": 1} for b in ("rare", "middle", "frequent")},
            "spectra": [{"effective_rank": 1.0, "singular_values": [1.0]}],
        }

    records = [
        record("full", 2, 0.01, 0, 0.70, 0.70),
        record("full", 2, 0.1, 0, 0.72, 0.71),
        record("full", 2, 0.1, 1, 0.72, 0.73),
    ]
    (group,) = summarise(records)
    assert group["lr"] == 0.1 and group["seeds"] == [0, 1]
    assert group["test_auc"] == pytest.approx(0.72)
    assert group["test_auc_std"] == pytest.approx(np.std([0.71, 0.73], ddof=1))


def group(method, dim, auc, std, hidden=None, val=None):
    return {
        "method": method,
        "dim": dim,
        "hidden": hidden,
        "lr": 0.02,
        "test_auc": auc,
        "test_auc_std": std,
        "val_auc": val if val is not None else auc,
        "embedding_bytes": dim * 400,
    }


def test_verdict_quotes_a_factor_only_on_width_limited_data():
    limited = [
        group("full", 2, 0.760, 0.0005),
        group("full", 4, 0.765, 0.0005),
        group("full", 16, 0.7740, 0.0004),
        group("full", 64, 0.7742, 0.0006),
        group("mlet", 2, 0.768, 0.0005, hidden=64),
        group("mlet", 4, 0.7738, 0.0005, hidden=64),
        group("mlet", 4, 0.7700, 0.0005, hidden=16),
    ]
    v = verdict(limited)
    assert v["width_limited"]
    assert v["equal_full"]["dim"] == 16  # 0.7740 is within max(0.0006, 0.001) of 0.7742
    assert v["smallest_matching_mlet"]["dim"] == 4
    assert v["reduction"] == 4
    equivalents = {(e["dim"], e["hidden"]): e for e in v["equivalents"]}
    assert equivalents[(2, 64)]["full_dim"] == 4  # 0.768 >= 0.765 - 0.001, < 0.774 - 0.001
    assert equivalents[(4, 64)]["full_dim"] == 64 and equivalents[(4, 64)]["width_ratio"] == 16

    flat = [group("full", d, 0.7710 + 0.0001 * i, 0.001) for i, d in enumerate((2, 4, 16))]
    flat.append(group("mlet", 2, 0.7712, 0.001, hidden=64))
    v = verdict(flat)
    assert not v["width_limited"] and v["reduction"] is None


def test_effective_rank_of_matrices_of_known_rank():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((200, 16)))
    equal_spectrum = (
        q[:, :5] @ np.diag([3.0] * 5) @ np.linalg.qr(rng.standard_normal((16, 16)))[0][:5]
    )
    assert effective_rank(singular_values(equal_spectrum)) == pytest.approx(5.0, rel=1e-6)
    rank_one = np.outer(rng.standard_normal(50), rng.standard_normal(8))
    assert effective_rank(singular_values(rank_one)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(np.array([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(np.array([1.0, -1.0]))


def test_truncated_svd_of_a_known_matrix():
    u, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((30, 4)))
    v, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((6, 4)))
    s = np.array([5.0, 3.0, 1.0, 0.5])
    matrix = u @ np.diag(s) @ v.T  # [30, 6], rank 4
    np.testing.assert_allclose(truncate_rank(matrix, 4), matrix, atol=1e-12)
    best_two = truncate_rank(matrix, 2)
    np.testing.assert_allclose(best_two, u[:, :2] @ np.diag(s[:2]) @ v[:, :2].T, atol=1e-12)
    # Eckart-Young: the error's spectral norm is the first dropped singular value.
    assert np.linalg.norm(matrix - best_two, 2) == pytest.approx(1.0)
    assert np.linalg.matrix_rank(best_two) == 2
    assert low_rank_bytes(rows=30, width=6, rank=2) == (30 * 2 + 2 * 6) * 4
    with pytest.raises(ValueError, match="rank must be positive"):
        truncate_rank(matrix, 0)


def test_frequency_buckets_split_test_rows_by_training_count():
    train_ids = np.array([0] * 50 + [1] * 10 + [2] * 2 + [3])
    test_ids = np.array([0, 0, 1, 1, 2, 2, 3, 4, 0])
    buckets = frequency_buckets(train_ids, test_ids)
    # counts: 0->50, 1->10, 2->2, 3->1, 4 (never seen)->0
    expected = {0: 2, 1: 1, 2: 0, 3: 0, 4: 0}
    assert buckets.tolist() == [expected[i] for i in test_ids.tolist()]
    assert (
        bucket_auc(np.array([1, 0, 1, 0, 1, 0, 1, 0, 1]), np.linspace(0, 1, 9), buckets)[
            "frequent"
        ]["rows"]
        == 3
    )


def test_bucket_auc_is_none_for_a_one_class_bucket():
    result = bucket_auc(
        np.array([1, 1, 0, 1]), np.array([0.2, 0.9, 0.1, 0.8]), np.array([0, 0, 1, 1])
    )
    assert result["rare"]["auc"] is None and result["rare"]["rows"] == 2
    assert result["middle"]["auc"] == 1.0
    assert result["frequent"] == {"rows": 0, "auc": None}


def test_bad_study_configs_are_refused():
    with pytest.raises(ValueError, match="regimes must be among"):
        StudyConfig(regimes=("two-pass",))
    with pytest.raises(ValueError, match="SVD widths must be below"):
        StudyConfig(full_dims=(2, 4), svd_dims=(4,))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        StudyConfig(seeds=(1, 1))
    assert os.fspath(Cell("tuned", "mlet", 4, 64, 0.02, 1).path("r")) == (
        "r/cells/tuned/mlet-d4-k64-lr0.02-s1.json"
    )


def test_cli_study_options_become_the_study_config():
    from cli import build_parser
    from study.command import StudyCommand

    args = build_parser().parse_args(
        ["study", "--data", "data/x", "--quick", "--mlet-hidden", "16,64", "--seeds", "0,1,2"]
    )
    assert args.handler.__name__ == "cmd_study"
    command = StudyCommand(
        data=args.data, quick=args.quick, seeds=args.seeds, grid={"mlet_hidden": args.mlet_hidden}
    )
    config = command.study_config()
    assert config.mlet_hidden == (16, 64) and config.max_rows == 100_000
    assert str(command.out_path()).endswith("results/study-x-quick")


def test_overhead_measures_every_variant_against_the_matching_full_table(tiny_data):
    from mlet.dataset import load_dataset
    from study.overhead import OverheadConfig, measure_overhead, overhead_table

    config = OverheadConfig(
        dim=2, hidden=(4,), equal_accuracy_dim=8, batch_size=16, steps=2, rounds=1, warmup_steps=1
    )
    result = measure_overhead(load_dataset(tiny_data), config)
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"full d=2", "mlet d=2 k=4", "full d=8"}
    assert rows["full d=2"]["vs_full_same_dim"] == 1.0
    assert rows["full d=8"]["vs_full_equal_accuracy"] == 1.0
    mlet = rows["mlet d=2 k=4"]
    assert mlet["vs_full_same_dim"] == mlet["total_ms"] / rows["full d=2"]["total_ms"]
    assert all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in rows.values())
    table = overhead_table(result)
    assert "| mlet d=2 k=4 |" in table and "fused rwsadagrad" in table
    # a result measured before the TorchRec trainer says so
    old = {**result, "config": {k: v for k, v in result["config"].items() if k != "optimizer"}}
    assert "before TorchRec" in overhead_table(old)


def test_overhead_stage_times_the_widths_given(tiny_data, tmp_path, monkeypatch):
    import study.command as study_command
    from cli import build_parser

    seen = {}

    def fake_measure(dataset, config):
        seen["config"] = config
        return {"config": {}, "rows": []}

    monkeypatch.setattr(study_command, "measure_overhead", fake_measure)
    monkeypatch.setattr(study_command, "overhead_table", lambda result: "")
    out = tmp_path / "s"
    args = build_parser().parse_args(
        ["study", "--data", str(tiny_data), "--out", str(out), "--stage", "overhead",
         "--overhead-widths", "2,8"]
    )  # fmt: skip
    args.handler(args)  # no grid in the folder: the measurement alone, at the widths given
    assert (out / "overhead.json").is_file()
    assert (seen["config"].dim, seen["config"].equal_accuracy_dim) == (2, 8)
    assert seen["config"].hidden == (16, 32, 64, 128)
    with pytest.raises(ValueError, match="overhead widths"):
        study_command.StudyCommand(data="x", overhead_widths=(4,))
    too_wide = study_command.StudyCommand(
        data=str(tiny_data), out=str(out), stage="overhead", overhead_widths=(256, 512)
    )
    with pytest.raises(ValueError, match="no inner width k >= d=256"):
        study_command.run_study_command(too_wide)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--data", "x", "--overhead-widths", "4"])
