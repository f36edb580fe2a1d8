"""The checks every exported variant passes before anything reaches the repository.

Each check collects every problem it finds instead of stopping at the first, so a failed
export prints the whole checklist: ONNX structure, parity with PyTorch on every runtime
available here, accuracy against the fp32 export, and TensorRT compatibility.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from export.references import HeldOut, References, max_abs_diff
from export.runtimes import onnxruntime_probabilities, tensorrt_probabilities
from export.tensorrt_checks import check_tensorrt_file
from mlet.metrics import log_loss, roc_auc
from mlet.run import Run
from mlet.runtime import CPU, CUDA, cuda_provider_reason
from mlet.spec import ExportSpec
from mlet.variants import VARIANTS

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


@dataclass
class CheckContext:
    """What every variant's checks compare with."""

    run: Run
    spec: ExportSpec  # fp32's; each variant's own spec differs only in its tolerance
    held: HeldOut
    references: References
    collapse_diff: float
    max_auc_loss: float | None
    log: Callable[[str], None]


@dataclass
class VariantCheck:
    """What the checks of one variant found; the manifest is written from it."""

    problems: list[str] = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    probabilities: np.ndarray | None = None  # on the accuracy rows (CPU)
    tensorrt_problems: list[str] = field(default_factory=list)  # ONNX: what TensorRT rejects
    engine: dict | None = None  # TensorRT: how the engine was built

    @property
    def passed(self) -> bool:
        return not self.problems and self.probabilities is not None


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


def check_onnx_variant(
    variant: str,
    name: str,
    path: Path,
    spec: ExportSpec,
    fp32: VariantCheck | None,
    context: CheckContext,
) -> VariantCheck:
    """Structure, PyTorch parity on every provider, accuracy against fp32 (`None`: this is
    fp32) of model `name`. `spec` is the variant's own, carrying its tolerance."""
    held = context.held
    check = VariantCheck(problems=check_onnx(path, spec))
    check.tensorrt_problems = check_tensorrt_file(path, spec.max_batch_size)
    reference, reference_name = context.references.for_variant(variant)
    providers, skipped = provider_parity(path, held.head(len(reference)), reference, spec, check)
    if CPU not in providers or (fp32 is not None and fp32.probabilities is None):
        return check  # the failure is recorded; nothing further can be compared
    context.log(
        f"{name}: parity with PyTorch " + ", ".join(f"{p} {d:.2e}" for p, d in providers.items())
    )
    check.probabilities = onnxruntime_probabilities(path, held.inputs, spec.max_batch_size)
    baseline = check.probabilities if fp32 is None else fp32.probabilities
    check.accuracy = accuracy_against(check.probabilities, baseline, held)
    check.problems += accuracy_problems(variant, check.accuracy, context.max_auc_loss)
    check.parity = {
        "rows": len(reference),
        "rows_source": held.source,
        "reference": reference_name,
        "tolerance": spec.tolerance,
        "collapse_max_abs_diff": context.collapse_diff,
        "onnxruntime_max_abs_diff": providers.get(CPU),
        "onnxruntime_providers": list(providers),
        "providers": providers,
        "providers_skipped": skipped,
    }
    return check


def provider_parity(
    path: Path, inputs: dict, reference: np.ndarray, spec: ExportSpec, check: VariantCheck
) -> tuple[dict[str, float], dict[str, str]]:
    """Max abs difference from PyTorch on each ONNX Runtime provider; CUDA where present."""
    providers, skipped = {}, {}
    for provider in (CPU, CUDA):
        reason = cuda_provider_reason() if provider == CUDA else None
        if reason is not None:
            skipped[provider] = reason
            continue
        try:
            got = onnxruntime_probabilities(path, inputs, spec.max_batch_size, provider)
        except RuntimeError as e:
            if provider == CPU:  # every model must run here
                check.problems.append(f"ONNX Runtime ({provider}) could not run it: {e}")
            else:
                skipped[provider] = str(e)
            continue
        providers[provider] = max_abs_diff(got, reference)
        if providers[provider] > spec.tolerance:
            check.problems.append(
                f"ONNX Runtime ({provider}) differs from PyTorch by {providers[provider]:.3g} "
                f"(tolerance {spec.tolerance:g})"
            )
    return providers, skipped


def accuracy_against(probabilities: np.ndarray, reference: np.ndarray, held: HeldOut) -> dict:
    """Max abs difference, AUC and log loss difference of a variant against the fp32 export."""
    figures = {
        "reference": "fp32 export, ONNX Runtime (CPU)",
        "rows": len(reference),
        "rows_source": held.source,
        "max_abs_diff": max_abs_diff(probabilities, reference),
        "auc": None,
        "auc_fp32": None,
        "auc_difference": None,
    }
    if held.labels is not None and 0 < held.labels.sum() < len(held.labels):
        figures["auc"] = roc_auc(held.labels, probabilities)
        figures["auc_fp32"] = roc_auc(held.labels, reference)
        figures["auc_difference"] = figures["auc"] - figures["auc_fp32"]
        figures["logloss"] = log_loss(held.labels, probabilities)
        figures["logloss_difference"] = figures["logloss"] - log_loss(held.labels, reference)
    else:
        figures["auc_note"] = "no labels for these rows: AUC not measured"
    return figures


def accuracy_problems(variant: str, accuracy: dict, max_auc_loss: float | None) -> list[str]:
    """A variant losing more test AUC than allowed (None: its own default) is refused."""
    if max_auc_loss is None:
        max_auc_loss = VARIANTS[variant].max_auc_loss
    loss = -(accuracy["auc_difference"] or 0.0)
    if variant != "fp32" and loss > max_auc_loss:
        return [f"loses {loss:.4f} test AUC against fp32 (at most {max_auc_loss:g} allowed)"]
    return []


def check_engine_variant(
    variant: str,
    name: str,
    plan: Path,
    source: tuple[str, Path, VariantCheck],
    spec: ExportSpec,
    fp32: VariantCheck,
    context: CheckContext,
) -> VariantCheck:
    """Build the engine from the staged ONNX `source` (name, path, its check), run it, and
    compare with ONNX Runtime on that source. `spec` is the source's, with its tolerance."""
    from mlet.tensorrt import BatchProfile, EngineBuildError, build_engine

    source_name, source_path, source_check = source
    check = VariantCheck()
    if source_check.probabilities is None or fp32.probabilities is None:
        check.problems.append(f"not built: {source_name} failed its checks")
        return check
    if source_check.tensorrt_problems:
        check.problems += [
            f"{source_name} is not TensorRT-compatible: {p}" for p in source_check.tensorrt_problems
        ]
        return check
    profile = BatchProfile(*spec.batch_profile())
    shapes = {t.name: t.shape for t in spec.inputs}
    try:
        check.engine = build_engine(source_path, plan, shapes, profile)
    except EngineBuildError as e:
        check.problems.append(str(e))
        return check
    context.log(f"{name}: engine built in {check.engine['build_seconds']:.1f}s")
    held = context.held
    check.probabilities = tensorrt_probabilities(plan, held.inputs, profile.max)
    runtime_diff = max_abs_diff(check.probabilities, source_check.probabilities)
    if runtime_diff > spec.tolerance:
        check.problems.append(
            f"TensorRT differs from ONNX Runtime on {source_name} by {runtime_diff:.3g} "
            f"(tolerance {spec.tolerance:g})"
        )
    check.accuracy = accuracy_against(check.probabilities, fp32.probabilities, held)
    check.problems += accuracy_problems(variant, check.accuracy, context.max_auc_loss)
    check.parity = {
        "rows": len(check.probabilities),
        "rows_source": held.source,
        "reference": f"ONNX Runtime ({CPU}) on {source_name}",
        "tolerance": spec.tolerance,
        "tensorrt_max_abs_diff": runtime_diff,
        "runtimes": ["TensorRT"],
    }
    return check
