"""The run folder: what training writes and export (or a PyTorch backend) reads back.

runs/<name>/config.json        data schema, model config, training config, versions
runs/<name>/model.safetensors  trained weights (a multi-layer table keeps W1 and W2)
runs/<name>/metrics.json       val/test metrics, timing, device
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mlet.dataset import DataSchema
from mlet.dlrm import DLRM, DLRMConfig
from mlet.files import read_json, write_json
from mlet.integrity import check_finite_weights, record_run_checksums, verify_run_checksums

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


def software_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


@dataclass
class Run:
    """A trained run read back from disk."""

    path: Path
    config: dict
    model_config: DLRMConfig
    schema: DataSchema
    metrics: dict

    def load_model(self, device: str = "cpu") -> DLRM:
        """Rebuild the model from its config and load its weights (no pickle involved)."""
        model = DLRM(self.model_config, sparse=False)
        state = load_file(self.path / WEIGHTS_FILE, device=device)
        model.load_state_dict(state)
        return model.to(device).eval()


def write_run_metadata(directory: Path, config: dict, metrics: dict) -> None:
    """config.json, metrics.json and the checksums, once model.safetensors is written."""
    write_json(directory / CONFIG_FILE, config)
    write_json(directory / METRICS_FILE, metrics)
    record_run_checksums(directory, [WEIGHTS_FILE])


def load_run(path: str | Path) -> Run:
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a training run: {name} is missing")
    config = read_json(path / CONFIG_FILE)
    metrics = read_json(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else {}
    return Run(
        path=path,
        config=config,
        model_config=DLRMConfig.from_dict(config["model"]),
        schema=DataSchema.from_dict(config["schema"]),
        metrics=metrics,
    )


def verify_run(run_folder: str | Path, table_names: list[str]) -> None:
    """What export checks before reading a run: its checksums and finite weights."""
    verify_run_checksums(run_folder)
    check_finite_weights(Path(run_folder) / WEIGHTS_FILE, table_names)
