"""Runtimes behind one interface: a backend loads a model file and runs a batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class SessionOptions:
    """ONNX Runtime session settings, chosen deliberately rather than left to defaults."""

    intra_op_threads: int = 0  # 0: ONNX Runtime picks (one per physical core)
    inter_op_threads: int = 1
    memory_arena: bool = True
    graph_optimization: str = "all"  # disable | basic | extended | all


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, options: SessionOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or SessionOptions()
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.enable_cpu_mem_arena = options.memory_arena
        session_options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.graph_optimization]
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, inputs), strict=True))
