"""Runtimes behind one interface: a backend is built from a model file and runs a batch.

- ONNX Runtime: CPU execution provider, CUDA and TensorRT providers when installed.
- TensorRT engines (model.plan), where TensorRT and a CUDA device are present.
- PyTorch eager on a training run folder: the uncompressed model, for comparison.
Each is imported only when used, so the server never loads torch unless asked to.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

Arrays = dict[str, np.ndarray]
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class Backend(Protocol):
    name: str

    def infer(self, inputs: Arrays) -> Arrays: ...


@dataclass(frozen=True)
class SessionOptions:
    """ONNX Runtime session settings, chosen deliberately rather than left to defaults.

    intra_op_threads 0 divides the cores among the model's concurrent instances. Spinning
    threads answer a little sooner but burn the CPU that HTTP parsing needs, so it is off.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    memory_arena: bool = True
    graph_optimization: str = "all"
    allow_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph optimisation must be one of {GRAPH_OPTIMIZATION_LEVELS}, "
                f"got {self.graph_optimization!r}"
            )


def threads_per_instance(options: SessionOptions, instances: int) -> int:
    if options.intra_op_threads > 0:
        return options.intra_op_threads
    return max(1, (os.cpu_count() or 1) // max(1, instances))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, options: SessionOptions, instances: int = 1) -> None:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        missing = [p for p in options.providers if p not in available]
        if missing:
            raise RuntimeError(f"ONNX Runtime here lacks {missing}; available: {sorted(available)}")
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads_per_instance(options, instances)
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.enable_cpu_mem_arena = options.memory_arena
        session_options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.graph_optimization]
        spinning = "1" if options.allow_spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        # One session serves every instance: run() is thread-safe and the weights are shared.
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options, providers=list(options.providers)
        )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: Arrays) -> Arrays:
        return dict(zip(self.output_names, self.session.run(None, inputs), strict=True))


class TorchBackend:
    """The trained model as PyTorch runs it, multi-layer tables uncollapsed."""

    name = "pytorch"

    def __init__(self, run_path: Path, threads: int = 0) -> None:
        import torch

        from mlet.run import load_run

        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.run = load_run(run_path)
        self.model = self.run.load_model()

    def infer(self, inputs: Arrays) -> Arrays:
        dense, sparse = (self.torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values())
        with self.torch.inference_mode():
            probability = self.model.probability(dense, sparse)
        return {"probability": probability.numpy()}


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
