"""TensorRT engines: build one from an exported ONNX file, and run it.

Shared by the export stage (which builds an engine and compares it with ONNX Runtime
before keeping it) and any backend that serves one. TensorRT and CUDA's Python bindings
are imported only when an engine is built or run, so this module imports on machines
without them; `unavailable_reason()` says why an engine cannot be built here.

Written against the TensorRT 10 and 11 Python API: the parser reads the ONNX file by path
(so external data resolves beside it), one optimization profile spans the batch
dimension, and the network is strongly typed: TensorRT 11 removed weak typing (the FP16
builder flag among it), and TensorRT 10 takes the STRONGLY_TYPED creation flag. An fp16
engine is therefore built from the fp16 ONNX variant, whose types say where half
precision is used, rather than from a builder flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WORKSPACE_BYTES = 1 << 30


class TensorRTUnavailable(RuntimeError):
    """TensorRT, CUDA's Python bindings or a CUDA device is missing on this machine."""


class EngineBuildError(RuntimeError):
    """TensorRT refused the model; the message carries the parser's or builder's errors."""


def _tensorrt():
    try:
        import tensorrt
    except Exception as e:  # ImportError, or a broken install failing to load its libraries
        raise TensorRTUnavailable(
            f"TensorRT is not installed here (import tensorrt failed: {e}); "
            "install the 'gpu' extra on a machine with an NVIDIA GPU"
        ) from e
    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.6 and later
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except Exception as e:
            raise TensorRTUnavailable(
                f"CUDA's Python bindings are not installed (import cuda failed: {e}); "
                "install cuda-python (the 'gpu' extra)"
            ) from e
    return cudart


def _cuda_call(result):
    """cuda-python returns (error, *values): raise on error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(getattr(error, "value", error)) != 0:  # cudaSuccess is 0
        raise RuntimeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


def unavailable_reason() -> str | None:
    """None when engines can be built and run here, else why not (for a clear skip)."""
    try:
        _tensorrt()
        cudart = _cudart()
        count = _cuda_call(cudart.cudaGetDeviceCount())
    except TensorRTUnavailable as e:
        return str(e)
    except RuntimeError as e:
        return f"no usable CUDA device: {e}"
    if count < 1:
        return "no CUDA device is visible"
    return None


@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile over the batch dimension: min, a typical opt, max rows."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    input_shapes: dict[str, tuple[int, ...]],
    profile: BatchProfile,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> dict:
    """Parse `onnx_path`, build a serialized engine and write it to `plan_path`.

    input_shapes: each input's shape without the batch dimension. Returns build facts for
    the manifest (TensorRT version, profile, seconds).
    """
    trt = _tensorrt()
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n- " + "\n- ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 would round float32 matmul inputs to 10 mantissa bits; keep fp32 exact.
        config.clear_flag(trt.BuilderFlag.TF32)
    optimization = builder.create_optimization_profile()
    for name, shape in input_shapes.items():
        optimization.set_shape(
            name, (profile.min, *shape), (profile.opt, *shape), (profile.max, *shape)
        )
    config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(serialized))
    return {
        "tensorrt": trt.__version__,
        "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
        "workspace_bytes": workspace_bytes,
        "build_seconds": time.perf_counter() - started,
    }


def _network_flags(trt) -> int:
    major = int(trt.__version__.split(".")[0])
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if major < 11 and strongly_typed is not None:
        return 1 << int(strongly_typed)
    return 0  # TensorRT 11 networks are strongly typed by default


class EngineRunner:
    """An engine with device buffers for its largest batch; `run` takes and returns NumPy."""

    def __init__(self, plan_path: Path) -> None:
        trt = _tensorrt()
        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not load the engine {plan_path}")
        self.context = self.engine.create_execution_context()
        self.stream = _cuda_call(self.cudart.cudaStreamCreate())
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [
            n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.names}
        self.max_shapes = {
            n: tuple(self.engine.get_tensor_profile_shape(n, 0)[2]) for n in self.inputs
        }
        self.max_batch = min(shape[0] for shape in self.max_shapes.values())
        self.buffers: dict[str, int] = {}
        for name in self.inputs:
            self._allocate(name, self.max_shapes[name])

    def _allocate(self, name: str, shape: tuple[int, ...]) -> None:
        nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
        self.buffers[name] = _cuda_call(self.cudart.cudaMalloc(max(nbytes, 1)))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch of at most the profile's max rows."""
        batch = len(next(iter(inputs.values())))
        if batch > self.max_batch:
            raise ValueError(
                f"batch of {batch} rows exceeds the engine's profile max {self.max_batch}"
            )
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            array = np.ascontiguousarray(inputs[name], dtype=self.dtypes[name])
            self.context.set_input_shape(name, array.shape)
            _cuda_call(self.cudart.cudaMemcpyAsync(
                self.buffers[name], array.ctypes.data, array.nbytes, h2d, self.stream
            ))  # fmt: skip
            self.context.set_tensor_address(name, self.buffers[name])
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if name not in self.buffers:
                self._allocate(name, (self.max_batch, *shape[1:]))
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self.buffers[name])
        if not self.context.execute_async_v3(stream_handle=self.stream):
            raise RuntimeError("TensorRT failed to enqueue the engine")
        for name, array in results.items():
            _cuda_call(self.cudart.cudaMemcpyAsync(
                array.ctypes.data, self.buffers[name], array.nbytes, d2h, self.stream
            ))  # fmt: skip
        _cuda_call(self.cudart.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        for pointer in self.buffers.values():
            _cuda_call(self.cudart.cudaFree(pointer))
        self.buffers.clear()
        _cuda_call(self.cudart.cudaStreamDestroy(self.stream))

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
