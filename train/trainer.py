"""Minibatch training of a DLRM with full or multi-layer embeddings.

Optimizer: Adagrad by default, as in the MLET paper's DLRM runs (SGD is the other choice).
Embedding tables produce sparse gradients and Adagrad updates only the rows a batch
touched (`train.sparse_adagrad`), so a step costs in proportion to the batch, not to the
table; the MLPs and MLET's projections are dense and updated every step.

Epochs run until validation AUC stops improving for `patience` epochs or `epochs` is
reached; the best epoch's weights are restored before the test evaluation and saved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlet.dataset import Dataset, load_dataset, split_rows
from mlet.dlrm import DLRM, DLRMConfig, build_config
from mlet.files import staged_directory
from mlet.metrics import classification_metrics
from mlet.run import software_versions, write_run
from mlet.transform import copy_vocabularies
from train.sparse_adagrad import Optimizers, RowSparseAdagrad, table_and_dense_parameters

OPTIMIZERS = ("adagrad", "sgd")
# "paper": tables uniform in +-sqrt(1/N) (DLRM's and the MLET paper's); "normal": tables
# N(0, table_init_std^2), the badly scaled contrast that trains slowly and flatters MLET.
TABLE_INITS = ("paper", "normal")
IN_MEMORY_LIMIT_BYTES = 4 << 30


@dataclass
class TrainConfig:
    embedding: str = "full"
    dim: int = 16
    hidden: int | None = None
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64, 32)
    interaction: str = "dot"
    optimizer: str = "adagrad"
    lr: float = 0.02
    embedding_lr: float | None = None  # defaults to lr
    batch_size: int = 512
    epochs: int = 5
    patience: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    eval_batch_size: int = 16384
    max_steps_per_epoch: int | None = None
    table_init: str = "paper"
    table_init_std: float = 1.0
    sparse: bool = True  # sparse table gradients (row-sparse updates); False for dense ones
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.table_init not in TABLE_INITS:
            raise ValueError(f"table_init must be one of {TABLE_INITS}, got {self.table_init!r}")
        if self.table_init_std <= 0:
            raise ValueError(f"table_init_std must be positive, got {self.table_init_std}")
        for name in ("dim", "batch_size", "epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or (self.embedding_lr is not None and self.embedding_lr <= 0):
            raise ValueError("learning rates must be positive")


@dataclass
class TrainResult:
    model: DLRM
    metrics: dict
    history: list[dict] = field(default_factory=list)
    test_probabilities: np.ndarray | None = None  # [test rows], in row order


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def model_config_for(dataset: Dataset, config: TrainConfig) -> DLRMConfig:
    schema = dataset.schema
    return build_config(
        num_dense=schema.num_dense,
        table_sizes=list(schema.table_sizes),
        table_names=list(schema.table_names),
        embedding=config.embedding,
        dim=config.dim,
        hidden=config.hidden,
        bottom_mlp=tuple(config.bottom_mlp),
        top_mlp=tuple(config.top_mlp),
        interaction=config.interaction,
        dense_transform=schema.dense_transform,
        hotness=schema.hotness,
    )


def build_model(dataset: Dataset, config: TrainConfig) -> DLRM:
    """The model to train, with the configured table initialisation (seed first)."""
    model = DLRM(model_config_for(dataset, config), sparse=config.sparse)
    if config.table_init == "normal":
        with torch.no_grad():
            for table in model.embeddings.tables:
                nn.init.normal_(table.table.weight, std=config.table_init_std)
    return model


def make_optimizer(model: DLRM, config: TrainConfig) -> Optimizers:
    """The tables' optimizer (row-sparse updates) and the rest's (dense), stepped as one."""
    tables, rest = table_and_dense_parameters(model)
    table_lr = config.embedding_lr or config.lr
    # foreach on the dense group: one call per update for all its tensors (the MLPs and
    # MLET's T projections) instead of a Python loop over them; the same numbers on CPU.
    if config.optimizer == "adagrad":
        return Optimizers(
            RowSparseAdagrad(tables, lr=table_lr),
            torch.optim.Adagrad(rest, lr=config.lr, foreach=True),
        )
    return Optimizers(
        torch.optim.SGD(tables, lr=table_lr), torch.optim.SGD(rest, lr=config.lr, foreach=True)
    )


class Batches:
    """Rows of one split as torch tensors, in memory when they fit, else memory-mapped."""

    def __init__(self, dataset: Dataset, rows: range) -> None:
        self.start, self.stop = rows.start, rows.stop
        arrays = (dataset.dense, dataset.sparse, dataset.labels)
        size = sum(a[self.start : self.stop].nbytes for a in arrays)
        load = np.asarray if size <= IN_MEMORY_LIMIT_BYTES else (lambda a: a)
        self.dense, self.sparse, self.labels = (load(a[self.start : self.stop]) for a in arrays)

    def __len__(self) -> int:
        return self.stop - self.start

    def take(self, index: np.ndarray, device: torch.device):
        index = np.sort(index)  # sequential reads when memory-mapped
        return (
            torch.from_numpy(np.asarray(self.dense[index], dtype=np.float32)).to(device),
            torch.from_numpy(np.asarray(self.sparse[index], dtype=np.int64)).to(device),
            torch.from_numpy(np.asarray(self.labels[index], dtype=np.float32)).to(device),
        )

    def in_order(self, batch_size: int, device: torch.device):
        for start in range(0, len(self), batch_size):
            yield self.take(np.arange(start, min(start + batch_size, len(self))), device)


@torch.no_grad()
def predict(model: DLRM, batches: Batches, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    scores = [
        torch.sigmoid(model(dense, sparse)).squeeze(1).cpu().numpy()
        for dense, sparse, _ in batches.in_order(batch_size, device)
    ]
    return np.concatenate(scores)


def evaluate(model: DLRM, batches: Batches, batch_size: int, device: torch.device) -> dict:
    probabilities = predict(model, batches, batch_size, device)
    return classification_metrics(np.asarray(batches.labels), probabilities)


def train_model(dataset: Dataset, config: TrainConfig) -> TrainResult:
    """Train, early-stop on validation AUC, restore the best epoch, evaluate on test."""
    torch.manual_seed(config.seed)
    # Opt out of invariant checks on the sparse gradients that tables produce: torch builds
    # them itself, and checking every step costs time.
    torch.sparse.check_sparse_tensor_invariants.disable()
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    split = split_rows(len(dataset), config.val_fraction, config.test_fraction)
    train, val, test = (Batches(dataset, r) for r in (split.train, split.val, split.test))

    model = build_model(dataset, config).to(device)
    optimizer = make_optimizer(model, config)
    loss_fn = nn.BCEWithLogitsLoss()
    steps_per_epoch = -(-len(train) // config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    history: list[dict] = []
    best_auc, best_state, best_epoch, waited = -1.0, None, 0, 0
    train_seconds, steps, rows_seen = 0.0, 0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        started = time.perf_counter()
        total_loss = 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="step",
            disable=not config.progress,
            leave=False,
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            dense, sparse, labels = train.take(index, device)
            rows_seen += len(index)
            loss = loss_fn(model(dense, sparse).squeeze(1), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds
        steps += steps_per_epoch
        val_metrics = evaluate(model, val, config.eval_batch_size, device)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total_loss / steps_per_epoch,
                "seconds": epoch_seconds,
                **{f"val_{k}": v for k, v in val_metrics.items()},
            }
        )
        if config.progress:
            tqdm.write(
                f"epoch {epoch}: train loss {total_loss / steps_per_epoch:.4f}, "
                f"val AUC {val_metrics['auc']:.4f}, {epoch_seconds:.1f}s"
            )
        if val_metrics["auc"] > best_auc:
            best_auc, best_epoch, waited = val_metrics["auc"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= config.patience:
                break

    model.load_state_dict(best_state)
    test_probabilities = predict(model, test, config.eval_batch_size, device)
    metrics = {
        "val": evaluate(model, val, config.eval_batch_size, device),
        "test": classification_metrics(np.asarray(test.labels), test_probabilities),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": train_seconds,
        "steps": steps,
        "steps_per_second": steps / train_seconds,
        "rows_per_second": rows_seen / train_seconds,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "embedding_inference_params": sum(t.inference_params for t in model.config.tables),
        "embedding_training_params": sum(t.training_params for t in model.config.tables),
        "split_rows": {"train": len(train), "val": len(val), "test": len(test)},
        "history": history,
    }
    return TrainResult(
        model=model, metrics=metrics, history=history, test_probabilities=test_probabilities
    )


def train_run(
    data: str | Path, out: str | Path, config: TrainConfig, overwrite: bool = False
) -> TrainResult:
    """Train on the dataset folder `data` and write the run folder `out` atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    dataset = load_dataset(data)
    result = train_model(dataset, config)
    run_config = {
        "data": str(Path(data).resolve()),
        "schema": dataset.schema.to_dict(),
        "model": result.model.config.to_dict(),
        "train": asdict(config),
        "seed": config.seed,
        "versions": software_versions(),
    }
    with staged_directory(out, replace=overwrite) as staging:
        write_run(staging, run_config, result.model.cpu(), result.metrics)
        copy_vocabularies(data, staging)  # so that export, and then predict, can read raw rows
    return result
