"""Lower a DLRM to ONNX with a dynamic batch dimension, then check the file.

The graph itself is written by export.graph from the model's weights (one builder for
every variant and size); this module is its entry point for a model in memory and holds
the structural checks every exported file must pass.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from export.graph import LoweredModel, LoweringOptions, lower_variants
from export.sources import MemoryWeights
from mlet.dlrm import DLRM
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


def lower_to_onnx(
    model: DLRM,
    spec: ExportSpec,
    path: Path,
    variant: str = "fp32",
    options: LoweringOptions | None = None,
) -> LoweredModel:
    """Write `path` (and its external data file when large) for `model`, collapsed."""
    return lower_variants(MemoryWeights(model), spec, {variant: Path(path)}, options)[variant]


def check_onnx(path: Path, spec: ExportSpec) -> list[str]:
    """onnx.checker by path (so external data resolves), plus the graph rules we rely on."""
    problems = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        problems.append(f"onnx.checker: {e}")
    graph = onnx.load(str(path), load_external_data=False).graph
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
