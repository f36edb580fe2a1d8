"""Training step time of MLET against full tables, measured side by side in one process.

Every variant trains with `mlet train`'s engine (TorchRec tables, FBGEMM's fused update in
the backward pass, a torch optimizer for the dense part) on the same batches; variants
take turns in rounds so that a change in machine load falls on all of them alike, and
each figure is the median over rounds of the mean step time (forward; backward with the
fused table update; the dense optimizer's step, timed separately). Ratios are against
the full table of the same width and the full table of equal accuracy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from mlet.dataset import Dataset, split_rows
from mlet.markdown import markdown_table
from train.distributed import shard_model, start_processes
from train.loader import TrainBatches
from train.trainer import TrainConfig, build_model, model_config_for


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
    optimizer: str = "rwsadagrad"


@dataclass(frozen=True)
class Variant:
    embedding: str
    dim: int
    hidden: int | None = None

    @property
    def label(self) -> str:
        return f"{self.embedding} d={self.dim}" + (f" k={self.hidden}" if self.hidden else "")


def variants(config: OverheadConfig) -> list[Variant]:
    d = config.dim
    equal = config.equal_accuracy_dim if config.equal_accuracy_dim != d else None
    found = [Variant("full", d)]
    found += [Variant("mlet", d, k) for k in config.hidden]
    found += [Variant("full", equal)] if equal else []
    return found


class Timed:
    """A sharded model, its optimizer and accumulated forward/backward/step seconds."""

    def __init__(self, dataset: Dataset, variant: Variant, config: OverheadConfig) -> None:
        train_config = TrainConfig(
            embedding=variant.embedding,
            dim=variant.dim,
            hidden=variant.hidden,
            optimizer=config.optimizer,
            device=config.device,
            progress=False,
        )
        self.processes = start_processes(config.device)
        model = build_model(model_config_for(dataset, train_config), train_config)
        self.model, self.optimizer, _ = shard_model(
            model, model.embeddings, train_config, self.processes
        )
        self.variant = variant
        self.loss = nn.BCEWithLogitsLoss()

    def _sync(self) -> float:
        if self.processes.device.type == "cuda":
            torch.cuda.synchronize(self.processes.device)
        return time.perf_counter()

    def run(self, batches: list) -> np.ndarray:
        """Mean seconds per step of (forward, backward, optimizer step) over `batches`."""
        totals = np.zeros(3)
        for batch in batches:
            t0 = self._sync()
            loss = self.loss(self.model(batch.dense, batch.sparse).squeeze(1), batch.labels)
            t1 = self._sync()
            self.optimizer.zero_grad()
            loss.backward()
            t2 = self._sync()
            self.optimizer.step()
            t3 = self._sync()
            totals += (t1 - t0, t2 - t1, t3 - t2)
        return totals / len(batches)


def draw_batches(dataset: Dataset, config: OverheadConfig, device) -> list:
    """The first `steps` batches of a shuffled epoch, held in memory for every variant."""
    rows = split_rows(len(dataset)).train
    batches = TrainBatches(dataset, rows, config.batch_size, seed=0).epoch(1, device)
    drawn = [batch for _, batch in zip(range(config.steps), batches, strict=False)]
    batches.close()
    return drawn


def measure_overhead(dataset: Dataset, config: OverheadConfig) -> dict:
    """Step times of every variant and their ratios to the full tables."""
    if config.threads:
        torch.set_num_threads(config.threads)
    timed = [Timed(dataset, v, config) for v in variants(config)]
    device = timed[0].processes.device
    batches = draw_batches(dataset, config, device)
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
    """Ratios to the full tables of the same width and of equal accuracy."""
    full = {r["dim"]: r["total_ms"] for r in rows if r["embedding"] == "full"}
    for row in rows:
        equal = full.get(config.equal_accuracy_dim)
        row["vs_full_same_dim"] = row["total_ms"] / full[config.dim]
        row["vs_full_equal_accuracy"] = row["total_ms"] / equal if equal else None


def variants_note(result: dict) -> str:
    """What the rows mean; results from before the TorchRec trainer say so."""
    optimizer = result["config"].get("optimizer")
    if optimizer is None:
        return "Measured with the trainer before TorchRec (row-sparse Adagrad of its own)."
    return (
        f"Tables train as `mlet train` trains them: TorchRec, FBGEMM's fused {optimizer} "
        "inside the backward pass (so the backward column includes the table update)."
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
