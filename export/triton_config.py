"""config.pbtxt for Triton Inference Server, rendered from the export spec.

The project's own server reads manifest.json; this file lets a user who outgrows one
machine point Triton at the same repository unchanged.
"""

from __future__ import annotations

from mlet.spec import ExportSpec, TensorSpec
from mlet.variants import ONNX_PLATFORM, TENSORRT_PLATFORM

TRITON_TYPES = {
    "FP32": "TYPE_FP32",
    "FP16": "TYPE_FP16",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
}


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.shape)
    return (
        f'  {{\n    name: "{spec.name}"\n'
        f"    data_type: {TRITON_TYPES[spec.datatype]}\n"
        f"    dims: [ {dims} ]\n  }}"
    )


PLATFORMS = {ONNX_PLATFORM: "KIND_CPU", TENSORRT_PLATFORM: "KIND_GPU"}


def render_config(
    name: str,
    spec: ExportSpec,
    platform: str = ONNX_PLATFORM,
    instances: int = 1,
    kind: str | None = None,
) -> str:
    """A config.pbtxt Triton accepts: a TensorRT plan runs on a GPU instance, ONNX on CPU."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {list(PLATFORMS)}, got {platform!r}")
    kind = kind or PLATFORMS[platform]
    inputs = ",\n".join(_tensor(t) for t in spec.inputs)
    outputs = ",\n".join(_tensor(t) for t in spec.outputs)
    preferred = ", ".join(str(b) for b in spec.preferred_batch_sizes)
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n"
        "}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    )
