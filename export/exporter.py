"""Export a training run into a model repository in Triton's layout.

    models/<name>/config.pbtxt     Triton model configuration
    models/<name>/1/model.onnx     the collapsed model (+ model.onnx.data when large)
    models/<name>/manifest.json    source run, spec, parity figures, sizes, sha256, opset

Every check runs before anything reaches the repository: a failed check, a crash or an
interruption leaves the repository as it was.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_lowering import ExportError, check_onnx, lower_to_onnx
from export.triton_config import render_config
from mlet.data.dataset import load_dataset, split_rows
from mlet.dlrm import DLRM
from mlet.files import install_directory, new_staging_directory, read_json, sha256_file, write_json
from mlet.run import Run, load_run, software_versions
from mlet.spec import ExportSpec, spec_for

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"
MODEL_VERSION = "1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ExportConfig:
    name: str | None = None  # defaults to the run folder's name
    max_batch_size: int = 4096
    parity_rows: int = 4096
    replace: bool = False


@dataclass
class ExportResult:
    name: str
    path: Path
    manifest: dict
    status: str  # "written", "replaced" or "unchanged"


def held_out_inputs(run: Run, spec: ExportSpec, rows: int) -> tuple[dict[str, np.ndarray], str]:
    """Test-split rows of the run's dataset when it is still on disk, else valid random rows."""
    data = Path(run.config.get("data", ""))
    if (data / "schema.json").is_file():
        dataset = load_dataset(data)
        train = run.config.get("train", {})
        split = split_rows(
            len(dataset), train.get("val_fraction", 0.1), train.get("test_fraction", 0.1)
        )
        index = slice(split.test.start, min(split.test.stop, split.test.start + rows))
        dense_name, sparse_name = spec.input_names
        inputs = {
            dense_name: np.array(dataset.dense[index], dtype=np.float32),
            sparse_name: np.array(dataset.sparse[index], dtype=np.int64),
        }
        return inputs, f"test split of {data}"
    return spec.random_inputs(
        rows, np.random.default_rng(0)
    ), "random valid inputs (data not found)"


@torch.no_grad()
def torch_probabilities(model: DLRM, inputs: dict[str, np.ndarray]) -> np.ndarray:
    dense, sparse = (torch.from_numpy(v) for v in inputs.values())
    return model.eval().probability(dense, sparse).numpy()


def onnxruntime_probabilities(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def file_entries(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def model_summary(run: Run) -> dict:
    config = run.model_config
    tables = config.tables
    return {
        "embedding": config.embedding_kind,
        "dim": config.dim,
        "hidden": tables[0].hidden,
        "hotness": config.hotness,
        "dense_transform": config.dense_transform,
        "tables": [{"name": t.name, "rows": t.rows} for t in tables],
        "embedding_bytes_inference": 4 * sum(t.inference_params for t in tables),
        "embedding_bytes_training": 4 * sum(t.training_params for t in tables),
    }


def export_run(run_path: str | Path, repo: str | Path, config: ExportConfig) -> ExportResult:
    """Collapse, lower to ONNX, check both parities and install the model in `repo`."""
    started = time.perf_counter()
    run = load_run(run_path)
    name = config.name or run.path.name
    if not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '.' or '-'")
    final = Path(repo) / name

    model = run.load_model()
    collapsed = model.collapsed()
    spec = spec_for(collapsed.config, max_batch_size=config.max_batch_size)
    inputs, rows_source = held_out_inputs(run, spec, config.parity_rows)
    reference = torch_probabilities(model, inputs)
    collapse_diff = max_abs_diff(reference, torch_probabilities(collapsed, inputs))
    if collapse_diff > spec.tolerance:
        raise ExportError(
            f"collapsed model differs from the trained one by {collapse_diff:.3g} "
            f"(tolerance {spec.tolerance:g})"
        )

    staging = new_staging_directory(final)
    try:
        version = staging / MODEL_VERSION
        version.mkdir()
        onnx_path = version / "model.onnx"
        lower_to_onnx(collapsed, spec, onnx_path)
        problems = check_onnx(onnx_path, spec)
        runtime_diff = max_abs_diff(
            torch_probabilities(collapsed, inputs), onnxruntime_probabilities(onnx_path, inputs)
        )
        if runtime_diff > spec.tolerance:
            problems.append(
                f"ONNX Runtime differs from PyTorch by {runtime_diff:.3g} "
                f"(tolerance {spec.tolerance:g})"
            )
        if problems:
            raise ExportError("exported model failed its checks:\n- " + "\n- ".join(problems))
        (staging / CONFIG_FILE).write_text(render_config(name, spec))
        files = file_entries(staging)
        manifest = {
            "name": name,
            "version": MODEL_VERSION,
            "variant": "fp32",
            "platform": "onnxruntime_onnx",
            "model_file": f"{MODEL_VERSION}/model.onnx",
            "source_run": str(run.path.resolve()),
            "source_metrics": run.metrics.get("test", {}),
            "model": model_summary(run),
            "spec": spec.to_dict(),
            "opset": spec.opset,
            "parity": {
                "rows": len(reference),
                "rows_source": rows_source,
                "tolerance": spec.tolerance,
                "collapse_max_abs_diff": collapse_diff,
                "onnxruntime_max_abs_diff": runtime_diff,
                "onnxruntime_providers": ["CPUExecutionProvider"],
            },
            "files": files,
            "model_bytes": sum(f["bytes"] for p, f in files.items() if p.startswith("1/")),
            "export_seconds": time.perf_counter() - started,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": software_versions(),
        }
        write_json(staging / MANIFEST_FILE, manifest)
        status = install(staging, final, manifest, config.replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if status == "unchanged":
        manifest = read_json(final / MANIFEST_FILE)
    return ExportResult(name=name, path=final, manifest=manifest, status=status)


def install(staging: Path, final: Path, manifest: dict, replace: bool) -> str:
    """Put the staged model in place unless a different model already holds the name."""
    if not final.exists():
        install_directory(staging, final)
        return "written"
    existing = final / MANIFEST_FILE
    if existing.is_file() and read_json(existing).get("files") == manifest["files"]:
        return "unchanged"
    if not replace:
        raise FileExistsError(
            f"{final} already holds a different model; choose another --name "
            "or pass --replace to replace it"
        )
    install_directory(staging, final, replace=True)
    return "replaced"
