"""In-process timing and memory of one model: the ceiling a server is held to.

A runner is a function from named input arrays to outputs: an ONNX Runtime session on an
exported model folder, or PyTorch on a training run (the uncompressed model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from bench.requests import RequestFactory
from bench.stats import percentile
from mlet.files import read_json
from mlet.spec import ExportSpec

Runner = Callable[[dict[str, np.ndarray]], object]


@dataclass(frozen=True)
class SessionTiming:
    batch: int
    iterations: int
    p50_ms: float
    p99_ms: float
    rows_per_s: float


def model_spec(model_folder: Path) -> ExportSpec:
    return ExportSpec.from_dict(read_json(model_folder / "manifest.json")["spec"])


def onnxruntime_runner(model_folder: Path, threads: int = 0) -> Runner:
    import onnxruntime as ort

    manifest = read_json(model_folder / "manifest.json")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model_folder / manifest["model_file"]), options, providers=["CPUExecutionProvider"]
    )
    return lambda inputs: session.run(None, inputs)


def torch_runner(run_folder: Path, threads: int = 0) -> tuple[Runner, ExportSpec]:
    import torch

    from mlet.run import load_run
    from mlet.spec import spec_for

    if threads > 0:
        torch.set_num_threads(threads)
    run = load_run(run_folder)
    model = run.load_model()

    def infer(inputs):
        dense, sparse = (torch.from_numpy(v) for v in inputs.values())
        with torch.inference_mode():
            return model.probability(dense, sparse)

    return infer, spec_for(run.model_config)


def time_batch(
    runner: Runner,
    factory: RequestFactory,
    batch: int,
    min_iterations: int = 20,
    min_seconds: float = 1.0,
    warmup: int = 10,
) -> SessionTiming:
    """Latency percentiles and rows/s at one batch size, after warm-up, on skewed ids."""
    inputs = [factory.inputs(batch) for _ in range(8)]
    for i in range(warmup):
        runner(inputs[i % len(inputs)])
    seconds: list[float] = []
    while len(seconds) < min_iterations or sum(seconds) < min_seconds:
        started = time.perf_counter()
        runner(inputs[len(seconds) % len(inputs)])
        seconds.append(time.perf_counter() - started)
    return SessionTiming(
        batch=batch,
        iterations=len(seconds),
        p50_ms=percentile(seconds, 50) * 1000,
        p99_ms=percentile(seconds, 99) * 1000,
        rows_per_s=batch * len(seconds) / sum(seconds),
    )


def memory_snapshot(files_under: Path | None = None) -> dict:
    """Resident memory of this process, and the resident pages of files mapped from a folder.

    ONNX Runtime can memory-map external weights: RSS then counts only the pages that
    were touched, and the per-mapping figure says how much of the model file that is.
    """
    process = psutil.Process()
    info = process.memory_full_info()
    snapshot = {"rss_bytes": info.rss, "uss_bytes": info.uss}
    if files_under is not None:
        root = str(files_under.resolve())
        mapped = [m for m in process.memory_maps(grouped=True) if m.path.startswith(root)]
        snapshot["mapped_model_resident_bytes"] = sum(m.rss for m in mapped)
        snapshot["mapped_model_files"] = sorted(Path(m.path).name for m in mapped)
    return snapshot
