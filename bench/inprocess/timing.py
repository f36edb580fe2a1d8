"""In-process timing and memory of one model: the ceiling a server is held to.

A runner is a function from named input arrays to outputs (mlet.runtime builds them): an
ONNX Runtime session on an exported model folder, with the server's session options, or
PyTorch on a training run (the uncompressed model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.load.request_bodies import RequestFactory
from bench.stats import percentile
from mlet.repository import open_model
from mlet.runtime import Runner, SessionOptions, onnxruntime_runner
from mlet.spec import ExportSpec


@dataclass(frozen=True)
class SessionTiming:
    batch: int
    iterations: int
    p50_ms: float
    p99_ms: float
    rows_per_s: float


def onnxruntime_model(model_folder: Path, options: SessionOptions) -> tuple[Runner, ExportSpec]:
    """The newest version of an exported model, in a session built as the server builds it."""
    opened = open_model(model_folder)
    return onnxruntime_runner(opened.model_path, options), opened.manifest.spec


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
