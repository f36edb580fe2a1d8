"""In-process timing of an exported model in ONNX Runtime: the ceiling a server is held to."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.requests import RequestFactory
from mlet.files import read_json
from mlet.spec import ExportSpec


@dataclass(frozen=True)
class SessionTiming:
    batch: int
    iterations: int
    p50_ms: float
    p99_ms: float
    rows_per_s: float


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000, q))


def time_onnxruntime(
    model_folder: Path, batch: int, iterations: int = 200, warmup: int = 20, threads: int = 0
) -> SessionTiming:
    """Latency and rows/s of session.run at one batch size, on skewed ids like the data's."""
    import onnxruntime as ort

    manifest = read_json(model_folder / "manifest.json")
    spec = ExportSpec.from_dict(manifest["spec"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model_folder / manifest["model_file"]), options, providers=["CPUExecutionProvider"]
    )
    factory = RequestFactory(spec)
    inputs = [factory.inputs(batch) for _ in range(8)]
    for i in range(warmup):
        session.run(None, inputs[i % len(inputs)])
    seconds = []
    for i in range(iterations):
        started = time.perf_counter()
        session.run(None, inputs[i % len(inputs)])
        seconds.append(time.perf_counter() - started)
    return SessionTiming(
        batch=batch,
        iterations=iterations,
        p50_ms=percentile_ms(seconds, 50),
        p99_ms=percentile_ms(seconds, 99),
        rows_per_s=batch * iterations / sum(seconds),
    )
