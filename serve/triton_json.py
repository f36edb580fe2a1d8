"""A model's config.pbtxt as Triton answers `GET /v2/models/<m>/config`: ModelConfig JSON.

Triton completes a config before serving it (the backend a platform implies, the version
policy, instance group names, the default model file name) and prints every field, with
proto field names, enums by name and 64-bit integers as JSON numbers. Doing the same here
gives `tritonclient`'s get_model_config() the same answer from either engine.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2

from serve.model_config import read_model_config

PLATFORM_DEFAULTS = {  # platform -> (backend, default model file), as Triton fills them in
    "onnxruntime_onnx": ("onnxruntime", "model.onnx"),
    "tensorrt_plan": ("tensorrt", "model.plan"),
}
INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def completed_config(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    """The config with the fields Triton fills in when the file leaves them out."""
    config = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
    backend, filename = PLATFORM_DEFAULTS.get(config.platform, ("", ""))
    config.backend = config.backend or backend
    config.default_model_filename = config.default_model_filename or filename
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if not config.instance_group:
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    for i, group in enumerate(config.instance_group):
        group.name = group.name or f"{config.name}_{i}"
        group.count = group.count or 1
    config.optimization.input_pinned_memory.enable = True
    config.optimization.output_pinned_memory.enable = True
    return config


def _int64_as_numbers(message_type, data: dict) -> dict:
    """proto3 JSON writes 64-bit integers as strings; Triton writes numbers."""
    for name, value in data.items():
        field = message_type.fields_by_name.get(name)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for entry in value.values():
                    _int64_as_numbers(value_field.message_type, entry)
        elif field.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _int64_as_numbers(field.message_type, item)
        elif field.type in INT64_TYPES:
            data[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def config_json(config: model_config_pb2.ModelConfig) -> dict:
    """ModelConfig as Triton's HTTP endpoint prints it."""
    config = completed_config(config)
    data = json_format.MessageToDict(
        config, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    return _int64_as_numbers(config.DESCRIPTOR, data)


def model_config_json(folder: Path, name: str) -> dict:
    """The JSON of a model folder's config.pbtxt, named as served."""
    config = read_model_config(folder)
    config.name = config.name or name
    return config_json(config)


def spec_config(name: str, spec, platform: str) -> model_config_pb2.ModelConfig:
    """A config for a model served without a config.pbtxt (a PyTorch run)."""
    config = model_config_pb2.ModelConfig(
        name=name, platform=platform, max_batch_size=spec.max_batch_size
    )
    for tensors, target in ((spec.inputs, config.input), (spec.outputs, config.output)):
        for tensor in tensors:
            data_type = model_config_pb2.DataType.Value(f"TYPE_{tensor.datatype}")
            target.add(name=tensor.name, data_type=data_type, dims=tensor.shape)
    config.dynamic_batching.preferred_batch_size.extend(spec.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    return config


def served_config(handle) -> model_config_pb2.ModelConfig:
    """A loaded model's ModelConfig (serve.dataplane.ModelHandle), completed as Triton serves
    it: what gRPC's ModelConfig answers, and HTTP's config route prints as JSON."""
    folder = handle.config_folder or Path(handle.source).parent.parent  # <model>/<v>/<file>
    from_file = handle.config_folder is not None or handle.platform in PLATFORM_DEFAULTS
    if from_file and (folder / "config.pbtxt").is_file():
        config = read_model_config(folder)
        config.name = config.name or handle.name
    else:
        config = spec_config(handle.name, handle.spec, handle.platform)
    return completed_config(config)


def served_model_config(handle) -> dict:
    """`GET /v2/models/<m>/config` for a loaded model."""
    return config_json(served_config(handle))
