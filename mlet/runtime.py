"""The one place that builds runtimes for exported and trained models.

Export checks, the server, the Triton backend and every benchmark build their ONNX Runtime
sessions here from one `SessionOptions`, so a figure measured in one stage holds in the
others; the PyTorch runner of a training run lives here too. ONNX Runtime and torch are
imported only when used: the server never loads torch unless asked to.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

    from mlet.spec import ExportSpec

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# TF32 would round float32 matmul inputs on Ampere and later GPUs; parity wants float32.
CUDA_OPTIONS = {"use_tf32": "0"}
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

Arrays = dict[str, np.ndarray]
Runner = Callable[[Arrays], np.ndarray]


@dataclass(frozen=True)
class SessionOptions:
    """ONNX Runtime session settings, chosen deliberately rather than left to defaults.

    intra_op_threads 0 divides the cores among the model's concurrent instances. Spinning
    threads answer a little sooner but burn the CPU that HTTP parsing needs, so it is off.
    The first provider is the one the session must run on; a session that falls back to
    another is refused.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    memory_arena: bool = True
    graph_optimization: str = "all"
    allow_spinning: bool = False
    providers: tuple[str, ...] = (CPU,)

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph optimisation must be one of {GRAPH_OPTIMIZATION_LEVELS}, "
                f"got {self.graph_optimization!r}"
            )

    def on(self, provider: str) -> SessionOptions:
        """The same settings on one execution provider (CPU as the fallback for CUDA)."""
        return replace(self, providers=(provider, CPU) if provider != CPU else (CPU,))


def threads_per_instance(options: SessionOptions, instances: int) -> int:
    if options.intra_op_threads > 0:
        return options.intra_op_threads
    return max(1, (os.cpu_count() or 1) // max(1, instances))


def cuda_provider_reason() -> str | None:
    """None when ONNX Runtime can use CUDA here, else why not."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return "onnxruntime-gpu is not installed (CUDAExecutionProvider is not available)"
    return None


def onnxruntime_session(
    path: str | Path, options: SessionOptions | None = None, instances: int = 1
) -> onnxruntime.InferenceSession:
    """An InferenceSession on `options.providers[0]`; raises if ONNX Runtime chose another.

    One session serves every instance of a model: run() is thread-safe and the weights are
    shared, so `instances` only divides the cores among concurrent calls.
    """
    import onnxruntime as ort

    options = options or SessionOptions()
    available = set(ort.get_available_providers())
    missing = [p for p in options.providers if p not in available]
    if missing:
        raise RuntimeError(f"ONNX Runtime here lacks {missing}; available: {sorted(available)}")
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3  # errors only: fallback notices read as failures
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
    providers = [(p, CUDA_OPTIONS) if p == CUDA else p for p in options.providers]
    session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    wanted, active = options.providers[0], session.get_providers()[0]
    if active != wanted:
        raise RuntimeError(f"ONNX Runtime could not start {wanted} (it chose {active})")
    return session


def onnxruntime_runner(
    path: str | Path, options: SessionOptions | None = None, instances: int = 1
) -> Runner:
    """A function from named inputs to the first output (the probabilities)."""
    session = onnxruntime_session(path, options, instances)
    return lambda inputs: session.run(None, inputs)[0]


def torch_runner(run_folder: str | Path, threads: int = 0) -> tuple[Runner, ExportSpec]:
    """The trained model as PyTorch runs it (multi-layer tables uncollapsed), and its spec."""
    import torch

    from mlet.run import load_run
    from mlet.spec import spec_for

    if threads > 0:
        torch.set_num_threads(threads)
    run = load_run(run_folder)
    model = run.load_model()
    spec = spec_for(run.model_config)

    def infer(inputs: Arrays) -> np.ndarray:
        sparse = torch.from_numpy(np.ascontiguousarray(inputs[spec.sparse_input.name]))
        dense = inputs.get("dense", np.zeros((len(sparse), 0), np.float32))
        dense = torch.from_numpy(np.ascontiguousarray(dense))
        with torch.inference_mode():
            return model.probability(dense, sparse).numpy()

    return infer, spec
