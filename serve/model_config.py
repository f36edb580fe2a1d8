"""Read a model's config.pbtxt with Triton's own ModelConfig schema.

Parsing with Triton's protobuf message (shipped in tritonclient) means a config this
server accepts is one Triton accepts too, and a typo fails loudly with its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mlet.spec import DATATYPES, NamedTensors, TensorSpec

CONFIG_FILE = "config.pbtxt"
PYTHON_BACKEND = "python"  # Triton's Python backend: served here for transform steps only


@dataclass(frozen=True)
class ServingDefaults:
    """What config.pbtxt says about serving the model; the command line may override it."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    dynamic_batching: bool
    instances: int


def read_model_config(folder: Path) -> model_config_pb2.ModelConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}")
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"{path} is not a valid Triton model config: {e}") from e


def config_problems(config: model_config_pb2.ModelConfig) -> list[str]:
    """What Triton's model config validation refuses among the fields this server reads."""
    problems = []
    if config.max_batch_size < 0:
        problems.append(f"'max_batch_size' must be non-negative, got {config.max_batch_size}")
    elif config.max_batch_size == 0:
        # Triton accepts 0 (no batch dimension) and then checks the inputs' dims against the
        # model; these models take [batch, ...] inputs, which such a config contradicts.
        problems.append("'max_batch_size' 0 declares no batch dimension; these models have one")
    for size in config.dynamic_batching.preferred_batch_size:
        if size <= 0:
            problems.append(f"dynamic batching preferred size must be positive, got {size}")
        elif size > config.max_batch_size:
            problems.append(
                f"dynamic batching preferred size {size} must be <= max batch size "
                f"{config.max_batch_size}"
            )
    return problems


def serving_defaults(config: model_config_pb2.ModelConfig, where: str = "") -> ServingDefaults:
    """The serving settings of a config, read as Triton reads them; ValueError if it refuses.

    max_batch_size is the largest batch served (requests and merged batches alike); an
    instance group whose count is 0 or negative counts as 1, Triton's normalization.
    """
    problems = config_problems(config)
    if problems:
        raise ValueError(f"{where or CONFIG_FILE}: " + "; ".join(problems))
    batching = config.HasField("dynamic_batching")
    instances = sum(max(group.count, 1) for group in config.instance_group) or 1
    return ServingDefaults(
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size),
        max_queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds,
        dynamic_batching=batching,
        instances=instances,
    )


@dataclass(frozen=True)
class ConfigSpec(NamedTensors):
    """The shape contract of a model that has a config.pbtxt but no export manifest (an
    ensemble, a raw-row transform step): what validation and metadata read of a spec."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int


def config_datatype(data_type: int, where: str) -> str:
    """A config's TYPE_* as the KServe v2 datatype: TYPE_STRING travels as BYTES."""
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    datatype = "BYTES" if name == "STRING" else name
    if datatype not in DATATYPES:
        raise ValueError(f"{where}: data type {name} is not served here")
    return datatype


def config_tensors(entries, where: str) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(e.name, config_datatype(e.data_type, f"{where} '{e.name}'"), tuple(e.dims))
        for e in entries
    )


def config_spec(config: model_config_pb2.ModelConfig, where: str) -> ConfigSpec:
    """The inputs, outputs and batch bound a config declares (dims exclude the batch)."""
    serving_defaults(config, where)  # refuses what Triton refuses
    return ConfigSpec(
        inputs=config_tensors(config.input, f"{where}: input"),
        outputs=config_tensors(config.output, f"{where}: output"),
        max_batch_size=config.max_batch_size,
    )
