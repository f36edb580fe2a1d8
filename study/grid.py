"""The accuracy-against-embedding-size study: a resumable grid of training cells.

Methods: full tables at every width, MLET tables at (d, k), the post-hoc truncated SVD of
the widest full model's tables (no fine-tuning), and full tables with a contrasting
initialisation (N(0, std^2) instead of the paper's uniform +-sqrt(1/n)).

Two regimes:

- one-pass: one epoch at one learning rate, the same budget for every cell (the paper's
  regime, and production's, where data streams by once);
- tuned: every method and width gets the same learning-rate sweep, each run early-stopped
  on validation AUC with the best epoch restored. The rate is chosen on the first seed's
  validation AUC and the other seeds are run at it (the first seed's run is reused).

Every cell (one method, width, rate and seed) is written atomically to
<out>/cells/<regime>/<cell>.json when it finishes, so an interrupted study skips finished
cells when run again. The widest full model's weights are kept for the SVD baseline.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mlet.dataset import Dataset, load_dataset, split_rows
from mlet.files import read_json, write_json
from study.table_analysis import bucket_auc, frequency_buckets, table_spectra
from train.trainer import TrainConfig, train_model

REGIMES = ("one-pass", "tuned")
TRAINED_METHODS = ("full", "mlet", "full-normal")
BYTES_PER_VALUE = 4  # float32 tables at inference

# Settings that change what a cell's number means: a study folder refuses to mix them.
TRAINING_SETTINGS = (
    "max_rows", "one_pass_lr", "lrs", "max_epochs", "patience", "batch_size", "optimizer",
    "bottom_mlp", "top_mlp", "contrast_std", "val_fraction", "test_fraction",
)  # fmt: skip


@dataclass(frozen=True)
class StudyConfig:
    """The grid and the training budget. Defaults: the study of the issue's default size."""

    full_dims: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    mlet_dims: tuple[int, ...] = (2, 4, 8, 16)
    mlet_hidden: tuple[int, ...] = (16, 32, 64, 128)
    svd_dims: tuple[int, ...] = (2, 4, 8, 16, 32)
    contrast_dims: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    contrast_std: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = REGIMES
    one_pass_lr: float = 0.02
    lrs: tuple[float, ...] = (0.002, 0.02, 0.2)
    max_epochs: int = 8
    patience: int = 1
    batch_size: int = 512
    max_rows: int | None = 300_000
    optimizer: str = "rwsadagrad"
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64, 32)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    workers: int = 1
    threads: int = 0  # torch threads per worker; 0 keeps torch's default
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.regimes) - set(REGIMES)
        if unknown or not self.regimes:
            raise ValueError(f"regimes must be among {REGIMES}, got {self.regimes}")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if "tuned" in self.regimes and len(self.lrs) < 1:
            raise ValueError("the tuned regime needs at least one learning rate")
        if self.svd_dims and max(self.svd_dims) >= self.widest_full:
            raise ValueError(
                f"SVD widths must be below the widest full width {self.widest_full}, "
                f"got {self.svd_dims}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")

    @property
    def widest_full(self) -> int:
        return max(self.full_dims)

    def training_settings(self) -> dict:
        return {name: _jsonable(getattr(self, name)) for name in TRAINING_SETTINGS}


def quick_config(**overrides) -> StudyConfig:
    """The `--quick` grid: fewer widths, rows and epochs; still 3 seeds and both regimes."""
    options = dict(
        full_dims=(2, 4, 16, 64),
        mlet_dims=(2, 4),
        mlet_hidden=(16, 64),
        svd_dims=(2, 4, 16),
        contrast_dims=(4, 64),
        max_rows=100_000,
        max_epochs=4,
    )
    options.update(overrides)
    return StudyConfig(**options)


@dataclass(frozen=True)
class Cell:
    """One training (or SVD) run: method, width, inner width, rate, seed, regime."""

    regime: str
    method: str
    dim: int
    hidden: int | None = None
    lr: float = 0.02
    seed: int = 0

    @property
    def group(self) -> str:
        """The cell without rate and seed: what a line on a plot is made of."""
        inner = f"-k{self.hidden}" if self.hidden is not None else ""
        return f"{self.method}-d{self.dim}{inner}"

    @property
    def name(self) -> str:
        return f"{self.group}-lr{self.lr:g}-s{self.seed}"

    def path(self, out: Path) -> Path:
        return Path(out) / "cells" / self.regime / f"{self.name}.json"

    def weights_path(self, out: Path) -> Path:
        return Path(out) / "weights" / self.regime / f"{self.name}.safetensors"


def training_groups(config: StudyConfig, regime: str) -> list[Cell]:
    """One cell per trained method and width, at seed 0 and the one-pass rate."""
    cells = [Cell(regime, "full", d) for d in config.full_dims]
    cells += [
        Cell(regime, "mlet", d, k) for d in config.mlet_dims for k in config.mlet_hidden if k >= d
    ]
    cells += [Cell(regime, "full-normal", d) for d in config.contrast_dims]
    return cells


def one_pass_cells(config: StudyConfig) -> list[Cell]:
    return [
        replace(group, lr=config.one_pass_lr, seed=seed)
        for group in training_groups(config, "one-pass")
        for seed in config.seeds
    ]


def sweep_cells(config: StudyConfig) -> list[Cell]:
    """The tuned regime's learning-rate sweep, on the first seed."""
    return [
        replace(group, lr=lr, seed=config.seeds[0])
        for group in training_groups(config, "tuned")
        for lr in config.lrs
    ]


def chosen_lr(config: StudyConfig, group: Cell, out: Path) -> float:
    """The sweep's rate with the best validation AUC for this group (first seed)."""
    scores = {}
    for lr in config.lrs:
        result = read_json(replace(group, lr=lr, seed=config.seeds[0]).path(out))
        scores[lr] = result["metrics"]["val"]["auc"]
    return max(scores, key=lambda lr: (scores[lr], -lr))


def tuned_seed_cells(config: StudyConfig, out: Path) -> list[Cell]:
    """The other seeds of every tuned group, at its chosen rate (needs the sweep done)."""
    cells = []
    for group in training_groups(config, "tuned"):
        lr = chosen_lr(config, group, out)
        cells += [replace(group, lr=lr, seed=seed) for seed in config.seeds[1:]]
    return cells


def train_config_for(config: StudyConfig, cell: Cell) -> TrainConfig:
    one_pass = cell.regime == "one-pass"
    return TrainConfig(
        embedding="mlet" if cell.method == "mlet" else "full",
        dim=cell.dim,
        hidden=cell.hidden,
        bottom_mlp=config.bottom_mlp,
        top_mlp=config.top_mlp,
        optimizer=config.optimizer,
        stop_on="auc",  # the study compares and selects by AUC
        lr=cell.lr,
        batch_size=config.batch_size,
        epochs=1 if one_pass else config.max_epochs,
        patience=config.patience,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        table_init="normal" if cell.method == "full-normal" else "paper",
        table_init_std=config.contrast_std,
        seed=cell.seed,
        device=config.device,
        progress=False,
    )


def open_study_data(data: str | Path, max_rows: int | None) -> Dataset:
    """The dataset, cut to its first `max_rows` rows (still memory-mapped)."""
    dataset = load_dataset(data)
    if max_rows is None or max_rows >= len(dataset):
        return dataset
    return Dataset(
        schema=replace(dataset.schema, rows=max_rows),
        dense=dataset.dense[:max_rows],
        sparse=dataset.sparse[:max_rows],
        labels=dataset.labels[:max_rows],
    )


def largest_table(dataset: Dataset) -> int:
    return int(np.argmax(dataset.schema.table_sizes))


def test_buckets(dataset: Dataset, config: StudyConfig) -> np.ndarray:
    """Frequency bucket (rare, middle, frequent) of each test row's id in the largest table."""
    split = split_rows(len(dataset), config.val_fraction, config.test_fraction)
    column = largest_table(dataset)
    ids = np.asarray(dataset.sparse[:, column])
    ids = ids[:, 0] if ids.ndim == 2 else ids  # multi-hot: bucket by the first id
    train_ids = ids[split.train.start : split.train.stop]
    return frequency_buckets(train_ids, ids[split.test.start : split.test.stop])


def embedding_bytes(table_sizes: tuple[int, ...], dim: int) -> int:
    return sum(table_sizes) * dim * BYTES_PER_VALUE


def run_cell(data: str, cell: Cell, config: StudyConfig, out: str) -> dict:
    """Train one cell and write its result (and, for the widest full table, its weights)."""
    out = Path(out)
    if config.threads:
        torch.set_num_threads(config.threads)
    dataset = open_study_data(data, config.max_rows)
    started = time.perf_counter()
    result = train_model(dataset, train_config_for(config, cell))
    model = result.model.cpu()
    labels = np.asarray(dataset.labels[-len(result.test_probabilities) :])
    record = {
        "cell": asdict(cell),
        "metrics": {k: v for k, v in result.metrics.items() if k != "history"},
        "history": result.history,
        "embedding_bytes": embedding_bytes(dataset.schema.table_sizes, cell.dim),
        "bucket_auc": bucket_auc(labels, result.test_probabilities, test_buckets(dataset, config)),
        "spectra": table_spectra([t.numpy() for t in model.embeddings.collapse()]),
        "wall_seconds": time.perf_counter() - started,
    }
    if cell.method == "full" and cell.dim == config.widest_full:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        path = cell.weights_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, tmp)
        tmp.replace(path)
    write_json(cell.path(out), record)
    return record


def check_settings(out: Path, config: StudyConfig, data: str | Path) -> None:
    """Record the study's settings, or refuse a folder made with different ones."""
    path = out / "study.json"
    settings = config.training_settings()
    if path.is_file():
        previous = read_json(path)
        changed = {
            k: (previous["settings"].get(k), v)
            for k, v in settings.items()
            if previous["settings"].get(k) != v
        }
        if changed:
            raise ValueError(
                f"{out} holds a study made with other training settings {changed} "
                "(old, new); choose another --out"
            )
        grid = {**previous.get("grid", {}), **_grid(config)}
    else:
        grid = _grid(config)
    write_json(path, {"data": str(Path(data).resolve()), "settings": settings, "grid": grid})


def _grid(config: StudyConfig) -> dict:
    names = ("full_dims", "mlet_dims", "mlet_hidden", "svd_dims", "contrast_dims", "seeds")
    return {name: list(getattr(config, name)) for name in names} | {"regimes": list(config.regimes)}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Progress:
    """Counts and a log line per finished cell, for a terminal or a nohup log."""

    total: int
    done: int = 0
    skipped: int = 0

    def line(self, cell: Cell, record: dict) -> str:
        test = record["metrics"]["test"]["auc"]
        return (
            f"[{self.done + self.skipped}/{self.total}] {cell.regime} {cell.name}: "
            f"test AUC {test:.4f}, {record.get('wall_seconds', 0.0):.1f}s"
        )


def run_cells(data: str | Path, cells: list[Cell], config: StudyConfig, out: Path, desc: str):
    """Run the cells not yet on disk, in `config.workers` processes; skip finished ones."""
    todo = [c for c in cells if not c.path(out).is_file()]
    progress = Progress(total=len(cells), skipped=len(cells) - len(todo))
    bar = tqdm(total=len(cells), initial=progress.skipped, desc=desc, disable=not config.progress)
    if progress.skipped:
        tqdm.write(f"{desc}: {progress.skipped} of {len(cells)} cells already done, skipped")

    def finished(cell: Cell, record: dict) -> None:
        progress.done += 1
        bar.update(1)
        tqdm.write(progress.line(cell, record))

    if config.workers == 1 or len(todo) <= 1:
        for cell in todo:
            finished(cell, run_cell(str(data), cell, config, str(out)))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=context) as pool:
            futures = {pool.submit(run_cell, str(data), c, config, str(out)): c for c in todo}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
    bar.close()
    return progress


def svd_cells(config: StudyConfig, regime: str, out: Path) -> list[Cell]:
    """SVD cells of a regime: each seed's widest full model (at its chosen rate) per width."""
    widest = Cell(regime, "full", config.widest_full)
    lr = chosen_lr(config, widest, out) if regime == "tuned" else config.one_pass_lr
    return [
        Cell(regime, "svd", d, lr=lr, seed=seed) for seed in config.seeds for d in config.svd_dims
    ]


def run_svd_cells(data: str | Path, config: StudyConfig, regime: str, out: Path) -> int:
    """Truncate the widest full model's tables to each SVD width and evaluate (no training)."""
    from study.svd_baseline import evaluate_truncated

    todo = [c for c in svd_cells(config, regime, out) if not c.path(out).is_file()]
    if not todo:
        return 0
    dataset = open_study_data(data, config.max_rows)
    buckets = test_buckets(dataset, config)
    for seed in sorted({c.seed for c in todo}):
        source = Cell(regime, "full", config.widest_full, lr=todo[0].lr, seed=seed)
        state = load_file(source.weights_path(out))
        for cell in (c for c in todo if c.seed == seed):
            train_config = train_config_for(config, source)
            record = evaluate_truncated(dataset, train_config, state, cell.dim, buckets)
            record["source"] = source.name
            record["cell"] = asdict(cell)
            write_json(cell.path(out), record)
            tqdm.write(f"{regime} {cell.name}: test AUC {record['metrics']['test']['auc']:.4f}")
    return len(todo)


def run_study(data: str | Path, out: str | Path, config: StudyConfig) -> Path:
    """Run (or resume) the whole grid; returns the study folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, config, data)
    if "one-pass" in config.regimes:
        run_cells(data, one_pass_cells(config), config, out, "one-pass")
        run_svd_cells(data, config, "one-pass", out)
    if "tuned" in config.regimes:
        run_cells(data, sweep_cells(config), config, out, "tuned: lr sweep")
        run_cells(data, tuned_seed_cells(config, out), config, out, "tuned: seeds")
        run_svd_cells(data, config, "tuned", out)
    return out


def load_cells(out: str | Path) -> list[dict]:
    """Every finished cell's record in a study folder."""
    return [read_json(p) for p in sorted((Path(out) / "cells").glob("*/*.json"))]
