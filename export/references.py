"""What every exported variant is compared with: held-out rows and PyTorch's answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.quantize import BITS, round_trip
from export.sources import RunWeights
from mlet.dataset import Split, load_dataset, split_rows
from mlet.dlrm import DLRM
from mlet.run import Run
from mlet.spec import ExportSpec


@dataclass
class HeldOut:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def head(self, rows: int) -> dict[str, np.ndarray]:
        return {name: value[:rows] for name, value in self.inputs.items()}


def recorded_split(run: Run, rows: int) -> Split:
    """The split the run trained on: its recorded row counts, else its recorded fractions."""
    counts = run.metrics.get("split_rows")
    if counts and sum(counts.values()) == rows:
        train, val = counts["train"], counts["val"]
        return Split(range(0, train), range(train, train + val), range(train + val, rows))
    train = run.config.get("train", {})
    return split_rows(rows, train.get("val_fraction", 0.1), train.get("test_fraction", 0.1))


def held_out(run: Run, spec: ExportSpec, rows: int) -> HeldOut:
    """Test-split rows and labels of the run's dataset when it is still on disk, else random
    valid rows without labels."""
    data = Path(run.config.get("data", ""))
    if (data / "schema.json").is_file():
        dataset = load_dataset(data)
        test = recorded_split(run, len(dataset)).test
        index = slice(test.start, min(test.stop, test.start + rows))
        inputs = spec.model_inputs(
            np.array(dataset.dense[index], dtype=np.float32),
            np.array(dataset.sparse[index], dtype=np.int64),
        )
        return HeldOut(inputs, np.array(dataset.labels[index]), f"test split of {data}")
    inputs = spec.random_inputs(rows, np.random.default_rng(0))
    return HeldOut(inputs, None, "random valid inputs (data not found)")


@torch.no_grad()
def torch_probabilities(model: DLRM, inputs: dict[str, np.ndarray]) -> np.ndarray:
    sparse = torch.from_numpy(inputs["sparse"])
    dense = torch.from_numpy(inputs.get("dense", np.zeros((len(sparse), 0), np.float32)))
    return model.eval().probability(dense, sparse).numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference; infinity when either holds NaN, so that no tolerance passes it."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.max(diff)) if np.isfinite(diff).all() else float("inf")


@torch.no_grad()
def dequantized_copy(collapsed: DLRM, variant: str = "int8") -> DLRM:
    """What a quantized variant holds, in PyTorch: the collapsed model with every table
    replaced by its row-wise round trip and the MLPs by their float16 round trip."""
    model = DLRM(collapsed.config, sparse=False)
    model.load_state_dict(collapsed.state_dict())
    for name, tensor in model.named_parameters():
        if not name.startswith("embeddings."):
            tensor.copy_(tensor.half().float())
    for table in model.embeddings.tables:
        rows = table.table.weight.numpy()
        table.table.weight.copy_(torch.from_numpy(round_trip(variant, rows)))
    return model.eval()


@dataclass
class References:
    """PyTorch's answers on the parity rows: the trained model and what each variant holds."""

    trained: np.ndarray
    collapsed: np.ndarray
    dequantized: dict[str, np.ndarray]  # int8, int4

    def for_variant(self, variant: str) -> tuple[np.ndarray, str]:
        if variant in self.dequantized:
            return self.dequantized[variant], (
                f"PyTorch, collapsed model with the {variant} round trip of its rows and "
                "float16 MLP weights"
            )
        return self.collapsed, "PyTorch, collapsed model (float32)"


def pytorch_references(
    weights: RunWeights, inputs: dict[str, np.ndarray], variants=tuple(BITS)
) -> References:
    """The trained and collapsed model's answers, and each quantized variant's among
    `variants` (the others are not computed)."""
    model, remapped = weights.reference_model(inputs["sparse"])
    local = {**inputs, "sparse": remapped}
    collapsed = model.collapsed()
    return References(
        trained=torch_probabilities(model, local),
        collapsed=torch_probabilities(collapsed, local),
        dequantized={
            variant: torch_probabilities(dequantized_copy(collapsed, variant), local)
            for variant in BITS
            if variant in variants
        },
    )
