"""Lower a (collapsed) DLRM to ONNX with a dynamic batch dimension, then check the file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from mlet.dlrm import DLRM, ProbabilityModel
from mlet.spec import ExportSpec

# Ops that EmbeddingBag and sequence-style lowerings produce. TensorRT rejects them and
# ONNX Runtime runs them slowly; a table lookup must be a plain Gather.
FORBIDDEN_OPS = frozenset(
    {
        "Loop",
        "If",
        "Scan",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceInsert",
        "SplitToSequence",
        "ConcatFromSequence",
    }
)


class ExportError(RuntimeError):
    """An exported artifact failed a check; nothing was written to the repository."""


def lower_to_onnx(model: DLRM, spec: ExportSpec, path: Path) -> None:
    """Write `path` (and its external data file when large) for `model` in eval mode."""
    model = model.eval()
    example = {
        name: torch.from_numpy(value)
        for name, value in spec.random_inputs(2, np.random.default_rng(0)).items()
    }
    batch = torch.export.Dim("batch", min=1, max=spec.max_batch_size)
    dynamic_shapes = {name: {0: batch} for name in spec.input_names}
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            ProbabilityModel(model),
            (),
            kwargs=example,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=spec.opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path), external_data=_needs_external_data(model))


def _needs_external_data(model: DLRM, limit_bytes: int = 1 << 30) -> bool:
    """Protobuf caps a file at 2 GB; keep large weights beside the graph well before that."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > limit_bytes


class _quiet_exporter:
    """Silence the exporter's progress lines; our own progress reporting is enough."""

    def __enter__(self):
        self.logger = logging.getLogger("torch.onnx")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def check_onnx(path: Path, spec: ExportSpec) -> list[str]:
    """onnx.checker by path (so external data resolves), plus the graph rules we rely on."""
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    problems = []
    ops = [node.op_type for node in graph.node]
    forbidden = sorted(set(ops) & FORBIDDEN_OPS)
    if forbidden:
        problems.append(f"graph uses ops that must not appear in a lookup path: {forbidden}")
    gathers = ops.count("Gather")
    if gathers < len(spec.table_rows):
        problems.append(f"expected a Gather per table ({len(spec.table_rows)}), found {gathers}")
    names = {"inputs": [i.name for i in graph.input], "outputs": [o.name for o in graph.output]}
    if names["inputs"] != spec.input_names:
        problems.append(f"graph inputs {names['inputs']} differ from {spec.input_names}")
    if names["outputs"] != spec.output_names:
        problems.append(f"graph outputs {names['outputs']} differ from {spec.output_names}")
    for value in graph.input:
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_param:
            problems.append(f"input {value.name} has a fixed batch dimension {batch.dim_value}")
    return problems
