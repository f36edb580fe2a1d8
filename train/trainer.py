"""Minibatch training of a DLRM with full or multi-layer tables, on TorchRec.

The tables are a TorchRec `EmbeddingBagCollection` sharded by `DistributedModelParallel`
(`train.distributed`) and updated inside the backward pass by FBGEMM's fused optimizer,
exact row-wise Adagrad by default; the MLPs and MLET's projections are dense and take a
torch optimizer. Batches stream from the memory-mapped dataset (`train.loader`).

Validation runs at the end of every epoch and, with `eval_every`, every that many steps;
each validation writes a checkpoint (`train.checkpoint`), and the best one by
`stop_on` (validation logloss by default) is kept on disk. Training stops after
`patience` validations without improvement or after `epochs`; the best checkpoint is then
loaded back, evaluated on test and saved as the run's model.safetensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from mlet.dataset import Dataset, load_dataset, split_rows
from mlet.dlrm import DLRM, DLRMConfig, build_config
from mlet.files import staged_directory
from mlet.metrics import classification_metrics
from mlet.run import WEIGHTS_FILE, load_run, software_versions, write_run_metadata
from mlet.transform import copy_vocabularies
from train.checkpoint import (
    POINTER,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from train.distributed import OPTIMIZERS, SHARDINGS, shard_model, start_processes
from train.loader import TrainBatches, ordered_batches
from train.saving import write_weights
from train.tables import TorchRecTables

# "paper": tables uniform in +-sqrt(1/N) (DLRM's and the MLET paper's); "normal": tables
# N(0, table_init_std^2), the badly scaled contrast that trains slowly and flatters MLET.
TABLE_INITS = ("paper", "normal")
STOP_ON = ("logloss", "auc")
MIN_LR = 1e-7  # DLRM's floor for a decaying learning rate


@dataclass
class TrainConfig:
    embedding: str = "full"
    dim: int = 16
    hidden: int | None = None
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64, 32)
    interaction: str = "dot"
    optimizer: str = "rwsadagrad"
    lr: float = 0.02
    embedding_lr: float | None = None  # defaults to lr
    batch_size: int = 512
    epochs: int = 5
    patience: int = 1  # validations without improvement before stopping
    stop_on: str = "logloss"
    eval_every: int | None = None  # steps between validations inside an epoch
    checkpoint_every: int | None = None  # steps between checkpoints besides validations
    lr_warmup_steps: int = 0
    lr_decay_start: int = 0
    lr_decay_steps: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    eval_batch_size: int = 16384
    max_steps_per_epoch: int | None = None
    sharding: str | None = None  # None: TorchRec's planner chooses
    table_init: str = "paper"
    table_init_std: float = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.bottom_mlp, self.top_mlp = tuple(self.bottom_mlp), tuple(self.top_mlp)
        choices = {
            "optimizer": OPTIMIZERS,
            "table_init": TABLE_INITS,
            "stop_on": STOP_ON,
            "sharding": (None, *SHARDINGS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.table_init_std <= 0:
            raise ValueError(f"table_init_std must be positive, got {self.table_init_std}")
        for name in ("dim", "batch_size", "epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "max_steps_per_epoch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "lr_decay_start", "lr_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr_decay_steps and self.lr_decay_start < self.lr_warmup_steps:
            raise ValueError("lr_decay_start must not come before the end of lr_warmup_steps")
        if self.lr <= 0 or (self.embedding_lr is not None and self.embedding_lr <= 0):
            raise ValueError("learning rates must be positive")

    @property
    def model_options(self) -> dict:
        """What decides the network and its training, not how long or where it runs."""
        ignored = {"epochs", "patience", "checkpoint_every", "progress", "device",
                   "eval_batch_size"}  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k not in ignored}


@dataclass
class TrainResult:
    metrics: dict
    history: list[dict] = field(default_factory=list)
    test_probabilities: np.ndarray | None = None  # [test rows], in row order
    run: Path | None = None
    _model: DLRM | None = None

    @property
    def model(self) -> DLRM:
        """The trained network as export rebuilds it (read from the run when there is one)."""
        if self._model is None:
            self._model = load_run(self.run).load_model()
        return self._model


def lr_scale(step: int, config: TrainConfig) -> float:
    """DLRM's schedule: linear warm-up, then polynomial (square) decay from decay_start."""
    warmup, start, steps = config.lr_warmup_steps, config.lr_decay_start, config.lr_decay_steps
    if step < warmup:
        return step / warmup
    if steps and step >= start:
        return ((steps - min(step - start, steps)) / steps) ** 2
    return 1.0


def set_learning_rates(optimizer, config: TrainConfig, step: int) -> None:
    scale = lr_scale(step, config)
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", group["lr"])
        group["lr"] = max(MIN_LR, base * scale) if scale < 1 else base


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


def build_model(model_config: DLRMConfig, config: TrainConfig) -> DLRM:
    """The DLRM to train, its tables TorchRec's (seeded first, so a seed repeats a run)."""
    torch.manual_seed(config.seed)
    normal_std = config.table_init_std if config.table_init == "normal" else None
    tables = TorchRecTables(list(model_config.tables), normal_std=normal_std)
    return DLRM(model_config, embeddings=tables)


def data_fingerprint(dataset: Dataset) -> dict:
    """What a resumed run checks to be sure it reads the same data."""
    return {"rows": len(dataset), "schema": dataset.schema.to_dict()}


@torch.no_grad()
def predict_rows(
    model: nn.Module,
    dataset: Dataset,
    rows: range,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> np.ndarray:
    """Probabilities of rows, in order, on every process; the batches stream from disk.

    Any model taking (dense, sparse): the sharded one in training, a plain DLRM after.
    """
    was_training = model.training
    model.eval()
    parts = [
        torch.sigmoid(model(batch.dense, batch.sparse)).squeeze(1)[:real].float().cpu().numpy()
        for batch, real in ordered_batches(dataset, rows, batch_size, device, rank, world)
    ]
    model.train(was_training)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [np.concatenate([ranks[j] for ranks in gathered]) for j in range(len(parts))]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def split_labels(dataset: Dataset, rows: range) -> np.ndarray:
    return np.asarray(dataset.labels[rows.start : rows.stop])


def improved(value: float, best: float | None, stop_on: str) -> bool:
    if best is None:
        return True
    return value < best if stop_on == "logloss" else value > best


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint's trainer.json."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    best_step: int = 0
    best_epoch: int = 0
    waited: int = 0
    stopped: bool = False
    train_seconds: float = 0.0
    rows_seen: int = 0
    history: list = field(default_factory=list)


class Trainer:
    """One training run on the processes of this world."""

    def __init__(
        self,
        dataset: Dataset,
        config: TrainConfig,
        root: Path,
        data_folder: Path | None = None,
        resume: bool = False,
    ) -> None:
        self.dataset, self.config, self.root = dataset, config, root
        self.data_folder = data_folder
        self.processes = start_processes(config.device)
        # the interrupted run's identity, read once: its plan is repeated, its rest checked
        self.resumed = read_trainer_state(checkpoint_path(root))["identity"] if resume else None
        fixed_plan = None
        if self.resumed and self.resumed["processes"] == self.processes.world:
            fixed_plan = self.resumed["plan"]  # whatever the planner would choose now
        self.model_config = model_config_for(dataset, config)
        split = split_rows(len(dataset), config.val_fraction, config.test_fraction)
        self.split = split
        if len(split.val) < self.processes.world or len(split.test) < self.processes.world:
            raise ValueError(f"too few rows to evaluate on {self.processes.world} processes")
        self.batches = TrainBatches(
            dataset, split.train, config.batch_size, config.seed,
            self.processes.rank, self.processes.world,
        )  # fmt: skip
        self.steps_per_epoch = self.batches.steps_per_epoch
        if config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        model = build_model(self.model_config, config)
        self.model, self.optimizer, self.plan = shard_model(
            model, model.embeddings, config, self.processes, fixed_plan
        )
        self.loss = nn.BCEWithLogitsLoss()
        self.progress = Progress()

    @property
    def is_main(self) -> bool:
        return self.processes.is_main

    def identity(self) -> dict:
        """What a checkpoint must share with this run to resume it."""
        return {
            "train": self.config.model_options,
            "data": data_fingerprint(self.dataset),
            "processes": self.processes.world,
            "plan": self.sharding_types(),
        }

    def sharding_types(self) -> dict[str, str]:
        tables = next(iter(self.plan.plan.values()))
        return {name: option.sharding_type for name, option in tables.items()}

    def resume(self) -> None:
        """Continue from the latest checkpoint (the Trainer was made with resume=True)."""
        path, saved = checkpoint_path(self.root, "latest"), self.resumed
        mine = json.loads(json.dumps(self.identity()))  # as JSON holds it: lists, not tuples
        for key in mine:
            if saved.get(key) != mine[key]:
                raise CheckpointError(
                    f"{path} was written by a different run: its {key} differs "
                    f"({_difference(saved.get(key), mine[key])})"
                )
        state = load_checkpoint(path, self.model, self.optimizer, self.processes.rank)
        for key in ("identity", "config", "data_folder"):
            state.pop(key)
        self.progress = Progress(**state)

    def checkpoint(self, best: bool) -> None:
        state = {
            "identity": self.identity(),
            "config": asdict(self.config),
            "data_folder": str(self.data_folder) if self.data_folder else None,
            **asdict(self.progress),
        }
        roles = ("latest", "best") if best else ("latest",)
        name = f"step-{self.progress.global_step:09d}"
        save_checkpoint(self.root, name, self.model, self.optimizer, state, self.processes.rank,
                        roles)  # fmt: skip

    def predict(self, rows: range) -> np.ndarray:
        p = self.processes
        return predict_rows(self.model, self.dataset, rows, self.config.eval_batch_size,
                            p.device, p.rank, p.world)  # fmt: skip

    def validate(self) -> None:
        """Validate, record, checkpoint, and decide whether to stop."""
        metrics = classification_metrics(
            split_labels(self.dataset, self.split.val), self.predict(self.split.val)
        )
        p = self.progress
        value = metrics[self.config.stop_on]
        better = improved(value, p.best, self.config.stop_on)
        p.history.append(
            {
                "epoch": p.epoch,
                "step": p.global_step,
                "train_seconds": p.train_seconds,
                **{f"val_{k}": v for k, v in metrics.items()},
            }
        )
        if better:
            p.best, p.best_step, p.best_epoch, p.waited = value, p.global_step, p.epoch, 0
        else:
            p.waited += 1
            p.stopped = p.waited >= self.config.patience
        if self.config.progress and self.is_main:
            tqdm.write(
                f"epoch {p.epoch} step {p.global_step}: val AUC {metrics['auc']:.4f}, "
                f"logloss {metrics['logloss']:.4f}" + (" (best)" if better else "")
            )
        self.checkpoint(best=better)

    def train_step(self, batch) -> float:
        set_learning_rates(self.optimizer, self.config, self.progress.global_step)
        # zero_grad also hands the fused table optimizer its learning rate, which it
        # applies inside the backward pass
        self.optimizer.zero_grad()
        loss = self.loss(self.model(batch.dense, batch.sparse).squeeze(1), batch.labels)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def fit(self) -> None:
        p, config = self.progress, self.config
        while not p.stopped and p.epoch <= config.epochs:
            if p.step_in_epoch < self.steps_per_epoch:
                self.run_epoch()
            if p.stopped:
                break
            if not p.history or p.history[-1]["step"] != p.global_step:
                self.validate()
            if p.stopped:
                break
            p.epoch, p.step_in_epoch = p.epoch + 1, 0
        if p.epoch > config.epochs:
            p.epoch = config.epochs

    def run_epoch(self) -> None:
        p, config = self.progress, self.config
        bar = tqdm(
            total=self.steps_per_epoch, initial=p.step_in_epoch, unit="step", leave=False,
            desc=f"epoch {p.epoch}/{config.epochs}", disable=not (config.progress and self.is_main),
        )  # fmt: skip
        batches = self.batches.epoch(p.epoch, self.processes.device, p.step_in_epoch)
        started, losses = time.perf_counter(), []
        for batch in batches:
            if p.step_in_epoch >= self.steps_per_epoch:
                break
            losses.append(self.train_step(batch))
            p.step_in_epoch += 1
            p.global_step += 1
            p.rows_seen += len(batch) * self.processes.world
            bar.update()
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            validate = config.eval_every and p.global_step % config.eval_every == 0
            save = config.checkpoint_every and p.global_step % config.checkpoint_every == 0
            if validate or save:
                p.train_seconds += time.perf_counter() - started
                self.validate() if validate else self.checkpoint(best=False)
                started = time.perf_counter()
                if p.stopped:
                    break
        batches.close()
        p.train_seconds += time.perf_counter() - started
        bar.close()

    def finish(self) -> tuple[dict, np.ndarray]:
        """Load the best checkpoint back; metrics and test probabilities of it."""
        load_checkpoint(checkpoint_path(self.root, "best"), self.model, self.optimizer,
                        self.processes.rank)  # fmt: skip
        p = self.progress
        best = next(h for h in p.history if h["step"] == p.best_step)
        test = self.predict(self.split.test)
        labels = split_labels(self.dataset, self.split.test)
        device = self.processes.device
        metrics = {
            "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
            "test": classification_metrics(labels, test),
            "best_epoch": p.best_epoch,
            "best_step": p.best_step,
            "epochs_run": p.epoch,
            "stop_on": self.config.stop_on,
            "train_seconds": p.train_seconds,
            "steps": p.global_step,
            "steps_per_second": p.global_step / max(p.train_seconds, 1e-9),
            "rows_per_second": p.rows_seen / max(p.train_seconds, 1e-9),
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "processes": self.processes.world,
            "sharding": self.sharding_types(),
            "torch_threads": torch.get_num_threads(),
            "embedding_inference_params": sum(t.inference_params for t in self.model_config.tables),
            "embedding_training_params": sum(t.training_params for t in self.model_config.tables),
            "split_rows": {
                "train": len(self.split.train),
                "val": len(self.split.val),
                "test": len(self.split.test),
            },
            "history": p.history,
        }
        return metrics, test


def _difference(saved, mine) -> str:
    if isinstance(saved, dict) and isinstance(mine, dict):
        keys = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in keys[:3])
    return f"{saved!r} there, {mine!r} here"


def train_model(dataset: Dataset, config: TrainConfig) -> TrainResult:
    """Train in memory (checkpoints in a temporary folder); the model comes back loaded."""
    with tempfile.TemporaryDirectory(prefix="mlet-train-") as work:
        trainer = Trainer(dataset, config, Path(work) / "checkpoints")
        trainer.fit()
        metrics, test = trainer.finish()
        weights = Path(work) / WEIGHTS_FILE
        write_weights(trainer.model, trainer.model_config, weights, trainer.processes.rank)
        model = DLRM(trainer.model_config, sparse=False)
        if trainer.is_main:
            model.load_state_dict(load_file(weights))
    return TrainResult(metrics, metrics["history"], test, _model=model.eval())


def checkpoint_root(out: Path) -> Path:
    """Checkpoints of the run `out` while it trains: a folder beside it."""
    return out.parent / f"{out.name}.checkpoints"


def train_run(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    overwrite: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Train on the dataset folder `data` and write the run folder `out` atomically.

    Checkpoints go to `out.checkpoints/` and are removed once the run is complete;
    `resume` continues from the latest of them.
    """
    out = Path(out)
    root = checkpoint_root(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if resume and not (root / POINTER).is_file():
        raise CheckpointError(f"nothing to resume: {root} holds no checkpoint of {out}")
    if not resume and (root / POINTER).is_file() and not overwrite:
        raise FileExistsError(
            f"{root} holds checkpoints of an interrupted run: continue it with "
            f"`mlet train --resume {out}`, or pass --overwrite to start over"
        )
    dataset = load_dataset(data)
    trainer = Trainer(dataset, config, root, Path(data).resolve(), resume)
    if resume:
        trainer.resume()
    elif trainer.is_main and root.exists():
        shutil.rmtree(root)
    trainer.fit()
    metrics, test = trainer.finish()
    run_config = {
        "data": str(Path(data).resolve()),
        "schema": dataset.schema.to_dict(),
        "model": trainer.model_config.to_dict(),
        "train": asdict(config),
        "seed": config.seed,
        "versions": software_versions(),
    }
    if trainer.is_main:
        with staged_directory(out, replace=overwrite) as staging:
            write_weights(trainer.model, trainer.model_config, staging / WEIGHTS_FILE, 0)
            write_run_metadata(staging, run_config, metrics)
            copy_vocabularies(data, staging)  # so that export, and then predict, can read rows
        shutil.rmtree(root, ignore_errors=True)
    else:
        write_weights(trainer.model, trainer.model_config, None, trainer.processes.rank)
    if trainer.processes.world > 1:
        dist.barrier()
    return TrainResult(metrics, metrics["history"], test, run=out)
