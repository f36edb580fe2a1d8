"""Training step time of MLET against full tables, measured side by side in one process.

Every variant trains on the same pre-drawn batches; variants take turns in rounds so that
a change in machine load falls on all of them alike, and each figure is the median over
rounds of the mean step time (forward, backward, optimizer step, timed separately).
Ratios are against the full table of the same width and the full table of equal accuracy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from mlet.dataset import Dataset, split_rows
from mlet.markdown import markdown_table
from train.sparse_adagrad import table_and_dense_parameters
from train.trainer import Batches, TrainConfig, build_model, make_optimizer, resolve_device


@dataclass(frozen=True)
class OverheadConfig:
    dim: int = 4
    hidden: tuple[int, ...] = (16, 32, 64, 128)
    equal_accuracy_dim: int | None = None  # the full width as accurate as MLET at `dim`
    batch_size: int = 512
    steps: int = 50
    rounds: int = 5
    warmup_steps: int = 10
    device: str = "cpu"
    threads: int = 0
    with_dense_gradients: bool = True  # also time dense table gradients (no row sparsity)
    with_torch_adagrad: bool = True  # also time the tables on torch's sparse Adagrad


@dataclass(frozen=True)
class Variant:
    """One way to train: the trainer's (row dedup, row-sparse Adagrad) unless it says not."""

    embedding: str
    dim: int
    hidden: int | None = None
    sparse: bool = True
    deduplicate: bool = True
    torch_adagrad: bool = False  # torch.optim.Adagrad's sparse path for the tables

    @property
    def label(self) -> str:
        parts = [f"{self.embedding} d={self.dim}" + (f" k={self.hidden}" if self.hidden else "")]
        parts += ["no row dedup"] if not self.deduplicate else []
        parts += ["torch's sparse Adagrad"] if self.torch_adagrad else []
        parts += ["dense gradients"] if not self.sparse else []
        return ", ".join(parts)


def variants(config: OverheadConfig) -> list[Variant]:
    d, widest = config.dim, max(config.hidden)
    equal = config.equal_accuracy_dim if config.equal_accuracy_dim != d else None
    found = [Variant("full", d)]
    found += [Variant("mlet", d, k) for k in config.hidden]
    found += [Variant("full", equal)] if equal else []
    found += [Variant("full", d, deduplicate=False), Variant("mlet", d, widest, deduplicate=False)]
    if config.with_torch_adagrad:
        found.append(Variant("full", d, torch_adagrad=True))
        # table by table with torch's Adagrad: how full tables trained before sharing row dedup
        found.append(Variant("full", d, deduplicate=False, torch_adagrad=True))
        found += [Variant("full", equal, torch_adagrad=True)] if equal else []
        found += [Variant("mlet", d, k, torch_adagrad=True) for k in config.hidden]
    if config.with_dense_gradients:
        found += [Variant("full", d, sparse=False), Variant("mlet", d, widest, sparse=False)]
    return found


def torch_sparse_adagrad(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch's Adagrad for everything: its sparse path (coalesce, sparse_mask) for tables."""
    tables, rest = table_and_dense_parameters(model)
    return torch.optim.Adagrad([{"params": tables}, {"params": rest, "foreach": True}], lr=lr)


class Timed:
    """A model, its optimizer and accumulated forward/backward/step seconds."""

    def __init__(self, dataset: Dataset, variant: Variant, device: torch.device) -> None:
        config = TrainConfig(
            embedding=variant.embedding,
            dim=variant.dim,
            hidden=variant.hidden,
            sparse=variant.sparse,
        )
        torch.manual_seed(0)
        self.variant = variant
        self.model = build_model(dataset, config).to(device).train()
        for table in self.model.embeddings.tables:
            table.deduplicate_rows = variant.deduplicate  # instance attribute: this model only
        if variant.torch_adagrad:
            self.optimizer = torch_sparse_adagrad(self.model, config.lr)
        else:
            self.optimizer = make_optimizer(self.model, config)
        self.loss = nn.BCEWithLogitsLoss()
        self.device = device

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run(self, batches: list) -> np.ndarray:
        """Mean seconds per step of (forward, backward, optimizer step) over `batches`."""
        totals = np.zeros(3)
        for dense, sparse, labels in batches:
            t0 = self._sync()
            loss = self.loss(self.model(dense, sparse).squeeze(1), labels)
            t1 = self._sync()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t2 = self._sync()
            self.optimizer.step()
            t3 = self._sync()
            totals += (t1 - t0, t2 - t1, t3 - t2)
        return totals / len(batches)


def measure_overhead(dataset: Dataset, config: OverheadConfig) -> dict:
    """Step times of every variant and their ratios to the full tables."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.sparse.check_sparse_tensor_invariants.disable()
    device = resolve_device(config.device)
    split = split_rows(len(dataset))
    train = Batches(dataset, split.train)
    rng = np.random.default_rng(0)
    batches = [
        train.take(rng.integers(0, len(train), config.batch_size), device)
        for _ in range(config.steps)
    ]
    timed = [Timed(dataset, v, device) for v in variants(config)]
    for t in timed:
        t.run(batches[: config.warmup_steps])
    samples = {t.variant.label: [] for t in timed}
    for _ in range(config.rounds):
        for t in timed:
            samples[t.variant.label].append(t.run(batches))
    rows = []
    for t in timed:
        parts = np.median(np.array(samples[t.variant.label]), axis=0)
        rows.append(
            {
                "label": t.variant.label,
                **asdict(t.variant),
                "forward_ms": parts[0] * 1e3,
                "backward_ms": parts[1] * 1e3,
                "step_ms": parts[2] * 1e3,
                "total_ms": parts.sum() * 1e3,
            }
        )
    add_ratios(rows, config)
    return {
        "config": asdict(config),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def add_ratios(rows: list[dict], config: OverheadConfig) -> None:
    """Ratios to the full tables trained the same way (optimizer, gradient kind, row dedup)."""
    full = {
        (r["dim"], r["sparse"], r["torch_adagrad"]): r["total_ms"]
        for r in rows
        if r["embedding"] == "full" and r["deduplicate"]
    }
    for row in rows:
        same_way = (row["sparse"], row["torch_adagrad"])
        same = full[(config.dim, *same_way)]
        equal = full.get((config.equal_accuracy_dim, *same_way))
        row["vs_full_same_dim"] = row["total_ms"] / same
        row["vs_full_equal_accuracy"] = row["total_ms"] / equal if equal else None


def variants_note(result: dict) -> str:
    """What the rows without a qualifier mean; older results (no torch_adagrad field) differ."""
    if result["rows"] and "torch_adagrad" not in result["rows"][0]:
        return "Ratios are to the full table trained the same way (optimizer, gradient kind)."
    return (
        "Unless a row says otherwise, tables train as `mlet train` trains them: each distinct "
        "id of a batch looked up once, row-sparse Adagrad. Ratios are to the full table "
        "trained the same way (optimizer, gradient kind), with row dedup."
    )


def overhead_table(result: dict) -> str:
    """The figures as a Markdown table."""
    equal = result["config"]["equal_accuracy_dim"]
    lines = [
        f"Device: {result['device_name']} ({result['device']}), torch threads "
        f"{result['torch_threads']}, batch {result['config']['batch_size']}, median of "
        f"{result['config']['rounds']} rounds of {result['config']['steps']} steps. "
        + variants_note(result),
        "",
    ]
    header = ["variant", "forward ms", "backward ms", "optimizer ms", "step ms",
              "vs full same d", f"vs full d={equal or '-'}"]  # fmt: skip
    rows = []
    for r in result["rows"]:
        vs_equal = f"{r['vs_full_equal_accuracy']:.2f}x" if r["vs_full_equal_accuracy"] else "-"
        rows.append(
            [r["label"], f"{r['forward_ms']:.2f}", f"{r['backward_ms']:.2f}",
             f"{r['step_ms']:.2f}", f"{r['total_ms']:.2f}", f"{r['vs_full_same_dim']:.2f}x",
             vs_equal]
        )  # fmt: skip
    return "\n".join(lines) + "\n" + markdown_table(header, rows, "lrrrrrr") + "\n"
