"""Run exported models where they will run: ONNX Runtime per execution provider, TensorRT.

The exporter checks every artifact on each runtime available on the machine: ONNX
Runtime's CPU provider always, its CUDA provider when onnxruntime-gpu and a CUDA device
are present, and TensorRT engines when TensorRT is. What is not available is reported
with the reason, never silently passed over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# TF32 would round float32 matmul inputs on Ampere and later GPUs; parity wants float32.
CUDA_OPTIONS = {"use_tf32": "0"}

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


def batches(inputs: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    rows = len(next(iter(inputs.values())))
    for start in range(0, rows, size):
        yield {name: value[start : start + size] for name, value in inputs.items()}


def predict_in_batches(predict: Predict, inputs: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Probabilities [N, 1] computed `size` rows at a time, as a server would send them."""
    return np.concatenate([predict(chunk) for chunk in batches(inputs, size)])


def cuda_provider_reason() -> str | None:
    """None when ONNX Runtime can use CUDA here, else why not."""
    if CUDA not in ort.get_available_providers():
        return "onnxruntime-gpu is not installed (CUDAExecutionProvider is not available)"
    return None


class OnnxRuntimeModel:
    """An InferenceSession on one provider; raises if that provider did not take the model."""

    def __init__(self, path: Path, provider: str = CPU) -> None:
        providers = [(CUDA, CUDA_OPTIONS), CPU] if provider == CUDA else [CPU]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: fallback notices would read as failures
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        active = self.session.get_providers()[0]
        if active != provider:
            raise RuntimeError(f"ONNX Runtime could not start {provider} (it chose {active})")
        self.provider = provider

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, inputs)[0]

    def close(self) -> None:
        # Dropping the session unmaps its external data: the next variant's session does not
        # add to this one's resident pages.
        del self.session


def onnxruntime_probabilities(
    path: Path, inputs: dict[str, np.ndarray], batch: int, provider: str = CPU
) -> np.ndarray:
    model = OnnxRuntimeModel(path, provider)
    try:
        return predict_in_batches(model, inputs, batch)
    finally:
        model.close()


def tensorrt_probabilities(plan: Path, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    from mlet.tensorrt import EngineRunner

    with EngineRunner(plan) as engine:
        output = engine.outputs[0]
        return predict_in_batches(lambda chunk: engine.run(chunk)[output], inputs, batch)
