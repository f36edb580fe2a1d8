"""Shared fixtures: a tiny dataset, tiny trained runs and a repository exported from them."""

from __future__ import annotations

import pytest

from data.synthetic import SyntheticConfig, generate
from export.exporter import ExportConfig
from tests.helpers import export_run
from train.trainer import TrainConfig, train_run

TINY_TABLES = (50, 7, 120, 3, 30)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny"
    generate(SyntheticConfig(rows=4000, table_sizes=TINY_TABLES, seed=3), path)
    return path


def tiny_train_config(**overrides) -> TrainConfig:
    options = dict(dim=4, bottom_mlp=(8,), top_mlp=(8,), epochs=1, batch_size=256, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    full = train_run(tiny_data, root / "full", tiny_train_config(embedding="full", dim=8))
    mlet = train_run(tiny_data, root / "mlet", tiny_train_config(embedding="mlet", hidden=16))
    assert full.metrics and mlet.metrics
    return {"full": root / "full", "mlet": root / "mlet"}


@pytest.fixture(scope="session")
def tiny_repo(tiny_runs, tmp_path_factory):
    repo = tmp_path_factory.mktemp("models")
    for name, run in tiny_runs.items():
        export_run(run, repo, ExportConfig(name=name, max_batch_size=512))
    return repo
