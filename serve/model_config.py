"""Read a model's config.pbtxt with Triton's own ModelConfig schema.

Parsing with Triton's protobuf message (shipped in tritonclient) means a config this
server accepts is one Triton accepts too, and a typo fails loudly with its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

CONFIG_FILE = "config.pbtxt"


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


def serving_defaults(config: model_config_pb2.ModelConfig) -> ServingDefaults:
    batching = config.HasField("dynamic_batching")
    instances = sum(group.count or 1 for group in config.instance_group) or 1
    return ServingDefaults(
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size),
        max_queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds,
        dynamic_batching=batching,
        instances=instances,
    )
