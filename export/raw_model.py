"""The raw-row model beside every exported model: logged columns in, probability out.

For a model folder NAME whose run carries a transform (a dataset written by `mlet data
criteo|avazu|csv`), export writes two more folders:

    NAME-transform   Triton `python` backend: serve/triton_transform.py as model.py, and
                     the transform.json and vocabularies (hard links where it can)
    NAME-raw         Triton `ensemble`: NAME-transform's dense and sparse into NAME

Each is staged and renamed into place like every model folder. They hold no manifest:
the raw model is a schedule over two models, not weights of its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from export.triton_config import check_triton_config, tensor_entry
from mlet.files import staged_directory
from mlet.raw_rows import RAW_SUFFIX, TRANSFORM_SUFFIX, RawColumn, raw_columns
from mlet.repository import CONFIG_FILE, FIRST_VERSION
from mlet.spec import ExportSpec, TensorSpec
from mlet.transform import TRANSFORM_FILE, load_transform, transform_files

TRANSFORM_MODEL = Path(__file__).resolve().parents[1] / "serve" / "triton_transform.py"


def raw_inputs(columns: list[RawColumn]) -> str:
    return ",\n".join(tensor_entry(TensorSpec(c.name, c.datatype, (1,))) for c in columns)


def tensors(specs: tuple[TensorSpec, ...]) -> str:
    return ",\n".join(tensor_entry(t) for t in specs)


def transform_config(name: str, columns: list[RawColumn], spec: ExportSpec) -> str:
    """The transform step: raw columns in, the model's own inputs out; requests that wait
    together are transformed in one call (Triton hands the Python backend them together)."""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {spec.max_batch_size}\n'
        f"input [\n{raw_inputs(columns)}\n]\noutput [\n{tensors(spec.inputs)}\n]\n"
        # a transform call costs about as much for 64 rows as for one: merge what waits
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n}}\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    )


def mapping(kind: str, names: list[str]) -> str:
    return "".join(f'      {kind} {{ key: "{n}" value: "{n}" }}\n' for n in names)


def ensemble_config(name: str, model_name: str, columns: list[RawColumn], spec: ExportSpec) -> str:
    """Two steps: the transform, then the model; tensors keep their names throughout."""
    inputs = [t.name for t in spec.inputs]
    outputs = [t.name for t in spec.outputs]
    steps = (
        f'    {{\n      model_name: "{model_name}{TRANSFORM_SUFFIX}"\n      model_version: -1\n'
        + mapping("input_map", [c.name for c in columns])
        + mapping("output_map", inputs)
        + f'    }},\n    {{\n      model_name: "{model_name}"\n      model_version: -1\n'
        + mapping("input_map", inputs)
        + mapping("output_map", outputs)
        + "    }"
    )
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {spec.max_batch_size}\n'
        f"input [\n{raw_inputs(columns)}\n]\noutput [\n{tensors(spec.outputs)}\n]\n"
        f"ensemble_scheduling {{\n  step [\n{steps}\n  ]\n}}\n"
    )


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links refused
        shutil.copyfile(source, target)


def write_raw_models(model: Path, spec: ExportSpec) -> list[Path]:
    """NAME-transform and NAME-raw beside the model folder NAME; none where the model
    carries no transform. Returns the folders written."""
    if not (model / TRANSFORM_FILE).is_file():
        return []
    repo, name = model.parent, model.name
    transform_name, raw_name = f"{name}{TRANSFORM_SUFFIX}", f"{name}{RAW_SUFFIX}"
    columns = raw_columns(load_transform(model).fmt)
    configs = {
        transform_name: transform_config(transform_name, columns, spec),
        raw_name: ensemble_config(raw_name, name, columns, spec),
    }
    for folder, text in configs.items():
        check_triton_config(text, folder)
    with staged_directory(repo / transform_name, replace=True) as staging:
        version = staging / FIRST_VERSION
        version.mkdir()
        shutil.copyfile(TRANSFORM_MODEL, version / "model.py")
        for path in transform_files(model):
            link_or_copy(path, version / path.name)
        (staging / CONFIG_FILE).write_text(configs[transform_name])
    with staged_directory(repo / raw_name, replace=True) as staging:
        (staging / FIRST_VERSION).mkdir()  # Triton wants a version folder, empty for ensembles
        (staging / CONFIG_FILE).write_text(configs[raw_name])
    return [repo / transform_name, repo / raw_name]
