"""config.pbtxt for Triton Inference Server, rendered from the export spec.

The project's own server reads manifest.json; this file lets a user who outgrows one
machine point Triton at the same repository unchanged.
"""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mlet.spec import ExportSpec, TensorSpec
from mlet.variants import ONNX_PLATFORM, TENSORRT_PLATFORM

# config.pbtxt `parameters` that let any client learn what valid input is from
# get_model_config(), on either engine, without file access to manifest.json.
TABLE_ROWS_PARAMETER = "sparse.table_rows"  # column t takes ids in [0, rows_t)
TABLE_NAMES_PARAMETER = "sparse.table_names"
DENSE_TRANSFORM_PARAMETER = "dense.transform"  # applied in the graph: send raw values
DENSE_TRANSFORMS = {"log1p": "log(1 + max(x, 0))"}

TRITON_TYPES = {
    "FP32": "TYPE_FP32",
    "FP16": "TYPE_FP16",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "BYTES": "TYPE_STRING",  # the raw-row models' categorical columns
}


def tensor_entry(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.shape)
    return (
        f'  {{\n    name: "{spec.name}"\n'
        f"    data_type: {TRITON_TYPES[spec.datatype]}\n"
        f"    dims: [ {dims} ]\n  }}"
    )


PLATFORMS = {ONNX_PLATFORM: "KIND_CPU", TENSORRT_PLATFORM: "KIND_GPU"}


def _parameters(spec: ExportSpec, dense_transform: str | None) -> str:
    values = {
        TABLE_ROWS_PARAMETER: ",".join(str(n) for n in spec.table_rows),
        TABLE_NAMES_PARAMETER: ",".join(spec.table_names),
    }
    if dense_transform is not None:
        formula = DENSE_TRANSFORMS.get(dense_transform, dense_transform)
        values[DENSE_TRANSFORM_PARAMETER] = f"{dense_transform}: {formula}"
    entries = ",\n".join(
        f'  {{\n    key: "{key}"\n    value: {{ string_value: "{value}" }}\n  }}'
        for key, value in values.items()
    )
    return f"parameters [\n{entries}\n]\n"


def render_config(
    name: str,
    spec: ExportSpec,
    platform: str = ONNX_PLATFORM,
    instances: int = 1,
    kind: str | None = None,
    dense_transform: str | None = None,
) -> str:
    """A config.pbtxt Triton accepts: a TensorRT plan runs on a GPU instance, ONNX on CPU.

    Raises ValueError naming every rule of Triton's the config would break.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {list(PLATFORMS)}, got {platform!r}")
    kind = kind or PLATFORMS[platform]
    inputs = ",\n".join(tensor_entry(t) for t in spec.inputs)
    outputs = ",\n".join(tensor_entry(t) for t in spec.outputs)
    preferred = ", ".join(str(b) for b in spec.preferred_batch_sizes)
    text = (
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
        + _parameters(spec, dense_transform)
    )
    check_triton_config(text, name)
    return text


def triton_config_problems(config: model_config_pb2.ModelConfig, folder_name: str) -> list[str]:
    """What Triton would refuse in this config (its model config validation, the rules an
    export can break), each in Triton's words where it has them."""
    name, problems = config.name, []
    if name != folder_name:
        problems.append(
            f"unexpected directory name '{folder_name}' for model '{name}', "
            "directory name must equal model name"
        )
    if config.max_batch_size < 0:
        problems.append(f"'max_batch_size' must be non-negative value for {name}")
    for size in config.dynamic_batching.preferred_batch_size:
        if size < 1:
            problems.append(f"dynamic batching preferred size must be positive for {name}")
        elif size > config.max_batch_size:
            problems.append(f"dynamic batching preferred size must be <= max batch size for {name}")
    seen = set()
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            if tensor.name in seen:
                problems.append(f"model {kind} '{tensor.name}' is named twice in {name}")
            seen.add(tensor.name)
            if any(d < 1 and d != -1 for d in tensor.dims):
                problems.append(
                    f"model {kind} '{tensor.name}' dimension must be integer >= 1, or -1 to "
                    f"indicate a variable-size dimension for {name}"
                )
    for group in config.instance_group:
        if group.count < 1:
            problems.append(f"instance group of model {name} must specify count >= 1")
    return problems


def check_triton_config(text: str, folder_name: str) -> None:
    """Parse with Triton's schema and apply its rules; raise ValueError listing each breach."""
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"config.pbtxt for {folder_name} does not parse: {e}") from e
    problems = triton_config_problems(config, folder_name)
    if problems:
        raise ValueError(
            f"Triton would refuse the config.pbtxt of {folder_name}: " + "; ".join(problems)
        )
