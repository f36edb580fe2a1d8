"""Runtimes behind one interface: a backend is built from a model file and runs a batch.

- ONNX Runtime: CPU execution provider, CUDA and TensorRT providers when installed.
- TensorRT engines (model.plan), where TensorRT and a CUDA device are present.
- PyTorch eager on a training run folder: the uncompressed model, for comparison.
Each is imported only when used, so the server never loads torch unless asked to.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from mlet.runtime import Arrays, SessionOptions, onnxruntime_session, torch_runner


class Backend(Protocol):
    name: str

    def infer(self, inputs: Arrays) -> Arrays: ...


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, options: SessionOptions, instances: int = 1) -> None:
        self.session = onnxruntime_session(path, options, instances)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: Arrays) -> Arrays:
        return dict(zip(self.output_names, self.session.run(None, inputs), strict=True))


class TorchBackend:
    """The trained model as PyTorch runs it, multi-layer tables uncollapsed."""

    name = "pytorch"

    def __init__(self, run_path: Path, threads: int = 0) -> None:
        self.run, self.spec = torch_runner(run_path, threads)

    def infer(self, inputs: Arrays) -> Arrays:
        return {"probability": self.run(inputs)}


class TensorRTBackend:
    """A TensorRT engine; its execution context serves one batch at a time."""

    name = "tensorrt"

    def __init__(self, plan_path: Path) -> None:
        from mlet.tensorrt import EngineRunner, unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot serve TensorRT engine {plan_path}: {reason}")
        self.runner = EngineRunner(plan_path)
        self.lock = threading.Lock()

    def infer(self, inputs: Arrays) -> Arrays:
        with self.lock:
            return self.runner.run(inputs)
