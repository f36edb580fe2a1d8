"""Run exported models where they will run, a batch at a time as a server sends them.

The exporter checks every artifact on each runtime available on the machine: ONNX
Runtime's CPU provider always, its CUDA provider when onnxruntime-gpu and a CUDA device
are present, and TensorRT engines when TensorRT is. Sessions come from mlet.runtime, with
the server's options, so the checked numbers are the served ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mlet.runtime import CPU, SessionOptions, onnxruntime_session

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


def batches(inputs: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    rows = len(next(iter(inputs.values())))
    for start in range(0, rows, size):
        yield {name: value[start : start + size] for name, value in inputs.items()}


def predict_in_batches(predict: Predict, inputs: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Probabilities [N, 1] computed `size` rows at a time, as a server would send them."""
    return np.concatenate([predict(chunk) for chunk in batches(inputs, size)])


def onnxruntime_probabilities(
    path: Path, inputs: dict[str, np.ndarray], batch: int, provider: str = CPU
) -> np.ndarray:
    # The session is dropped on return, which unmaps its external data: the next variant's
    # session does not add to this one's resident pages.
    session = onnxruntime_session(path, SessionOptions().on(provider))
    return predict_in_batches(lambda chunk: session.run(None, chunk)[0], inputs, batch)


def tensorrt_probabilities(plan: Path, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    from mlet.tensorrt import EngineRunner

    with EngineRunner(plan) as engine:
        output = engine.outputs[0]
        return predict_in_batches(lambda chunk: engine.run(chunk)[output], inputs, batch)
