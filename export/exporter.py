"""Export a training run into a model repository in Triton's layout, one model per variant.

    models/<name>/config.pbtxt            Triton model configuration
    models/<name>/1/model.onnx            fp32 (+ model.onnx.data when large)
    models/<name>-fp16/...                tables and MLPs in float16
    models/<name>-int8/...                row-wise 8-bit tables, float16-stored MLPs
    models/<name>-int4/...                row-wise 4-bit tables (two codes a byte), likewise
    models/<name>-trt/1/model.plan        TensorRT engine built from the fp32 ONNX
    models/<name>-trt-fp16/1/model.plan   TensorRT engine built from the fp16 ONNX
    models/<name>[-variant]/manifest.json source run, spec, parity and accuracy figures,
                                          sizes, sha256, opset

Every check of every variant runs before anything reaches the repository: a failed
check, a crash or an interruption leaves the repository as it was, and each model folder
appears whole (a complete staging folder renamed into place) or not at all.

The steps, in `export_variants`: PyTorch references on held-out rows (refusing a collapse
that changed the model), one staging folder per variant, every ONNX variant lowered in
one pass over the tables, each variant checked (export.checks), the manifest and
config.pbtxt written once per model from its check, then every model installed
(export.install).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from export.checks import (
    CheckContext,
    ExportError,
    VariantCheck,
    check_engine_variant,
    check_onnx_variant,
)
from export.graph import EXTERNAL_DATA_BYTES, LoweredModel, LoweringOptions, lower_variants
from export.install import ExportResult, file_entries, install_all
from export.raw_model import write_raw_models
from export.references import held_out, max_abs_diff, pytorch_references
from export.sources import RunWeights
from export.triton_config import render_config
from mlet.files import names_path_on_error, new_staging_directory
from mlet.repository import CONFIG_FILE, FIRST_VERSION, Manifest, write_manifest
from mlet.run import Run, load_run, software_versions, verify_run
from mlet.spec import ExportSpec, spec_for
from mlet.transform import copy_vocabularies
from mlet.variants import ONNX_VARIANTS, VARIANTS, Variant, model_name, parse_variants

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

__all__ = ["ExportConfig", "ExportError", "ExportReport", "ExportResult", "export_variants"]


@dataclass
class ExportConfig:
    name: str | None = None  # defaults to the run folder's name
    max_batch_size: int = 4096
    parity_rows: int = 4096  # held-out rows compared with PyTorch
    accuracy_rows: int = 65536  # held-out rows compared with the fp32 export (AUC, max diff)
    replace: bool = False
    variants: tuple[str, ...] = ("fp32",)
    # a variant losing more test AUC than this is refused; None: the variant's default
    # (0.001, int4 0.002)
    max_auc_loss: float | None = None
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # larger weights go to model.onnx.data
    max_tensor_elements: int = 2**31 - 1  # larger tables are split into row blocks
    block_rows: int = 1 << 16  # rows collapsed and written at a time


@dataclass
class ExportReport:
    results: list[ExportResult]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it was not built


@dataclass
class StagedVariant:
    """One variant being built: its staging folder, its own spec, and what its checks found."""

    variant: Variant
    name: str
    final: Path
    staging: Path
    spec: ExportSpec
    check: VariantCheck = field(default_factory=VariantCheck)
    lowered: LoweredModel | None = None

    @property
    def model_path(self) -> Path:
        return self.staging / FIRST_VERSION / self.variant.model_file


@names_path_on_error("repo")  # a full disk says which repository filled it
def export_variants(
    run_path: str | Path,
    repo: str | Path,
    config: ExportConfig,
    log: Callable[[str], None] = lambda line: None,
) -> ExportReport:
    """Collapse, lower every variant, check each against PyTorch and on every runtime
    available, then install the models in `repo`; TensorRT variants are skipped, with the
    reason, where TensorRT is not available."""
    started = time.perf_counter()
    run = load_run(run_path)
    verify_run(run.path, [table.name for table in run.model_config.tables])
    base = config.name or run.path.name
    variants = parse_variants(config.variants)
    check_names(base, variants)
    skipped = engine_skips(variants)
    wanted = [v for v in variants if v.name not in skipped]
    if not wanted:
        raise ExportError(f"nothing to export: {'; '.join(sorted(set(skipped.values())))}")
    weights = RunWeights(run)
    staged: dict[str, StagedVariant] = {}
    try:
        context = reference_context(run, weights, config, log)
        for variant in variants_to_build(wanted):
            staged[variant.name] = stage_variant(run, base, variant, Path(repo), config)
        lower_onnx_variants(weights, staged, config, log)
        weights.close()
        check_variants(staged, context)
        refuse_failures(staged.values())
        seconds = time.perf_counter() - started
        models = [finish_model(staged[v.name], run, seconds) for v in wanted]
        results = install_all(models, config.replace)
        for result in results:
            raw = write_raw_models(result.path, result.manifest.spec)
            if raw:
                log(f"{result.name}: raw-row model {raw[1].name} (transform {raw[0].name})")
        return ExportReport(results, skipped)
    finally:
        weights.close()
        for stage in staged.values():
            shutil.rmtree(stage.staging, ignore_errors=True)


def check_names(base: str, variants: tuple[Variant, ...]) -> None:
    for variant in variants:
        if not NAME_PATTERN.match(model_name(base, variant.name)):
            raise ValueError(f"model name {base!r} must be letters, digits, '_', '.' or '-'")


def engine_skips(variants: tuple[Variant, ...]) -> dict[str, str]:
    """TensorRT variants that cannot be built on this machine, with the reason."""
    engines = [v for v in variants if v.is_engine]
    if not engines:
        return {}
    from mlet.tensorrt import unavailable_reason

    reason = unavailable_reason()
    return {} if reason is None else {v.name: reason for v in engines}


def variants_to_build(wanted: list[Variant]) -> list[Variant]:
    """The wanted variants, fp32 (the accuracy reference) and the sources of wanted
    engines; ONNX graphs first, in the table's order, since engines are built from them."""
    names = {"fp32"} | {v.name for v in wanted} | {v.source for v in wanted if v.is_engine}
    onnx = [VARIANTS[n] for n in ONNX_VARIANTS if n in names]
    return onnx + [v for v in wanted if v.is_engine]


def reference_context(
    run: Run, weights: RunWeights, config: ExportConfig, log: Callable[[str], None]
) -> CheckContext:
    """Held-out rows and PyTorch's answers on them; refuses a collapse that changed the model."""
    spec = variant_spec(run, config, "fp32")
    held = held_out(run, spec, max(config.accuracy_rows, config.parity_rows))
    parity_inputs = held.head(config.parity_rows)
    log(f"PyTorch reference on {len(parity_inputs[spec.sparse_input.name])} rows")
    references = pytorch_references(weights, parity_inputs, config.variants)
    collapse_diff = max_abs_diff(references.trained, references.collapsed)
    if collapse_diff > spec.tolerance:
        raise ExportError(
            f"collapsed model differs from the trained one by {collapse_diff:.3g} "
            f"(tolerance {spec.tolerance:g})"
        )
    return CheckContext(run, spec, held, references, collapse_diff, config.max_auc_loss, log)


def variant_spec(run: Run, config: ExportConfig, variant: str) -> ExportSpec:
    return spec_for(run.model_config.collapsed(), config.max_batch_size, variant)


def stage_variant(
    run: Run, base: str, variant: Variant, repo: Path, config: ExportConfig
) -> StagedVariant:
    name = model_name(base, variant.name)
    # an engine serves the graph it was built from, with that graph's spec
    spec = variant_spec(run, config, variant.source or variant.name)
    render_config(name, spec, variant.platform)  # refuse what Triton would, before any work
    staging = new_staging_directory(repo / name)
    (staging / FIRST_VERSION).mkdir()
    return StagedVariant(variant, name, repo / name, staging, spec)


def lower_onnx_variants(
    weights: RunWeights, staged: dict[str, StagedVariant], config: ExportConfig, log
) -> None:
    """Write every ONNX variant in one pass over the tables."""
    graphs = [s for s in staged.values() if not s.variant.is_engine]
    options = LoweringOptions(
        max_tensor_elements=config.max_tensor_elements,
        external_data_bytes=config.external_data_bytes,
        block_rows=config.block_rows,
    )
    names = ", ".join(s.variant.name for s in graphs)
    log(f"lowering {names} ({weights.config.embedding_kind} tables)")
    spec = staged["fp32"].spec
    lowered = lower_variants(weights, spec, {s.variant.name: s.model_path for s in graphs}, options)
    for stage in graphs:
        stage.lowered = lowered[stage.variant.name]


def check_variants(staged: dict[str, StagedVariant], context: CheckContext) -> None:
    """fp32 first (every other variant's accuracy is measured against it), engines last."""
    fp32 = staged["fp32"]
    for stage in staged.values():
        if stage.variant.is_engine:
            source = staged[stage.variant.source]
            stage.check = check_engine_variant(
                stage.variant.name,
                stage.name,
                stage.model_path,
                (source.name, source.model_path, source.check),
                source.spec,
                fp32.check,
                context,
            )
        else:
            reference = None if stage is fp32 else fp32.check
            stage.check = check_onnx_variant(
                stage.variant.name, stage.name, stage.model_path, stage.spec, reference, context
            )
        if stage.variant.source is not None:
            stage.check.engine = (stage.check.engine or {}) | {
                "source_model": staged[stage.variant.source].name,
                "source_files": file_entries(staged[stage.variant.source].staging),
            }


def refuse_failures(staged) -> None:
    failures = [f"{s.name}: {p}" for s in staged for p in s.check.problems]
    if failures:
        raise ExportError("exported models failed their checks:\n- " + "\n- ".join(failures))


def finish_model(stage: StagedVariant, run: Run, seconds: float) -> tuple[Path, Path, Manifest]:
    """Write config.pbtxt and manifest.json into the staging folder: the manifest, once."""
    variant, check = stage.variant, stage.check
    transform = run.model_config.dense_transform  # told to clients in config.pbtxt
    config = render_config(stage.name, stage.spec, variant.platform, dense_transform=transform)
    (stage.staging / CONFIG_FILE).write_text(config)
    copy_vocabularies(run.path, stage.staging)  # so that `mlet predict` can read raw rows
    files = file_entries(stage.staging)
    lowered = stage.lowered
    manifest = Manifest(
        name=stage.name,
        variant=variant.name,
        platform=variant.platform,
        model_file=f"{FIRST_VERSION}/{variant.model_file}",
        spec=stage.spec,
        opset=stage.spec.opset,
        engine=check.engine,
        parity=check.parity,
        accuracy=check.accuracy,
        weights=None
        if lowered is None
        else {
            "table_bytes": lowered.table_bytes,
            "external_data": lowered.external_data,
            "row_blocks": lowered.row_blocks,
        },
        tensorrt_compatibility=None
        if variant.is_engine
        else {
            "compatible": not check.tensorrt_problems,
            "problems": check.tensorrt_problems[:20],
            "problem_count": len(check.tensorrt_problems),
        },
        source_run=str(run.path.resolve()),
        source_metrics=run.metrics.get("test", {}),
        model=model_summary(run),
        files=files,
        model_bytes=sum(f["bytes"] for p, f in files.items() if p.startswith(f"{FIRST_VERSION}/")),
        export_seconds=seconds,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        versions=software_versions(),
    )
    write_manifest(stage.staging, manifest)
    return stage.staging, stage.final, manifest


def model_summary(run: Run) -> dict:
    config = run.model_config
    tables = config.tables
    return {
        "embedding": config.embedding_kind,
        "dim": config.dim,
        "hidden": tables[0].hidden,
        "hotness": config.hotness,
        "dense_transform": config.dense_transform,
        "tables": [{"name": t.name, "rows": t.rows} for t in tables],
        "embedding_bytes_inference": 4 * sum(t.inference_params for t in tables),
        "embedding_bytes_training": 4 * sum(t.training_params for t in tables),
    }


def result_line(result: ExportResult) -> str:
    """One line per exported model for the command line."""
    manifest = result.manifest
    parity, accuracy = manifest.parity, manifest.accuracy
    line = f"{result.status} {result.path}: {manifest.variant}, {manifest.model_bytes:,} bytes"
    if "tensorrt_max_abs_diff" in parity:
        line += f", TensorRT vs ONNX Runtime max abs diff {parity['tensorrt_max_abs_diff']:.2e}"
    else:
        line += (
            f", collapse max abs diff {parity['collapse_max_abs_diff']:.2e}, ONNX Runtime max "
            f"abs diff {parity['onnxruntime_max_abs_diff']:.2e}"
        )
    if manifest.variant != "fp32":
        line += f", vs fp32 {accuracy['max_abs_diff']:.2e}"
        if accuracy["auc_difference"] is not None:
            line += f", AUC {accuracy['auc_difference']:+.5f}"
    return line
