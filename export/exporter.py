"""Export a training run into a model repository in Triton's layout, one model per variant.

    models/<name>/config.pbtxt            Triton model configuration
    models/<name>/1/model.onnx            fp32 (+ model.onnx.data when large)
    models/<name>-fp16/...                tables and MLPs in float16
    models/<name>-int8/...                row-wise 8-bit tables, float32 MLPs
    models/<name>-trt/1/model.plan        TensorRT engine built from the fp32 ONNX
    models/<name>-trt-fp16/1/model.plan   TensorRT engine built from the fp16 ONNX
    models/<name>[-variant]/manifest.json source run, spec, parity and accuracy figures,
                                          sizes, sha256, opset

Every check of every variant runs before anything reaches the repository: a failed
check, a crash or an interruption leaves the repository as it was, and each model folder
appears whole (a complete staging folder renamed into place) or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export.graph import EXTERNAL_DATA_BYTES, LoweredModel, LoweringOptions, lower_variants
from export.onnx_lowering import ExportError, check_onnx
from export.quantize import dequantize_rows, quantize_rows
from export.runtimes import (
    CPU,
    CUDA,
    cuda_provider_reason,
    onnxruntime_probabilities,
    tensorrt_probabilities,
)
from export.sources import RunWeights
from export.tensorrt_checks import check_tensorrt_file
from export.triton_config import render_config
from mlet.data.dataset import load_dataset, split_rows
from mlet.dlrm import DLRM
from mlet.files import install_directory, new_staging_directory, read_json, sha256_file, write_json
from mlet.metrics import roc_auc
from mlet.run import Run, load_run, software_versions
from mlet.spec import ExportSpec, spec_for

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"
MODEL_VERSION = "1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ONNX_VARIANTS = ("fp32", "fp16", "int8")
TENSORRT_SOURCES = {"trt": "fp32", "trt-fp16": "fp16"}  # engine variant -> ONNX it is built from
VARIANTS = ONNX_VARIANTS + tuple(TENSORRT_SOURCES)


@dataclass
class ExportConfig:
    name: str | None = None  # defaults to the run folder's name
    max_batch_size: int = 4096
    parity_rows: int = 4096  # held-out rows compared with PyTorch
    accuracy_rows: int = 65536  # held-out rows compared with the fp32 export (AUC, max diff)
    replace: bool = False
    variants: tuple[str, ...] = ("fp32",)
    max_auc_loss: float = 0.001  # a variant losing more test AUC than this is refused
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # larger weights go to model.onnx.data
    max_tensor_elements: int = 2**31 - 1  # larger tables are split into row blocks
    block_rows: int = 1 << 16  # rows collapsed and written at a time


@dataclass
class ExportResult:
    name: str
    path: Path
    manifest: dict
    status: str  # "written", "replaced" or "unchanged"


@dataclass
class ExportReport:
    results: list[ExportResult]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it was not built


@dataclass
class HeldOut:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def head(self, rows: int) -> dict[str, np.ndarray]:
        return {name: value[:rows] for name, value in self.inputs.items()}


def model_name(base: str, variant: str) -> str:
    return base if variant == "fp32" else f"{base}-{variant}"


def parse_variants(variants: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be among {list(VARIANTS)}, got {list(variants)}")
    return tuple(dict.fromkeys(variants))


def held_out(run: Run, spec: ExportSpec, rows: int) -> HeldOut:
    """Test-split rows and labels of the run's dataset when it is still on disk, else random
    valid rows without labels."""
    data = Path(run.config.get("data", ""))
    if (data / "schema.json").is_file():
        dataset = load_dataset(data)
        train = run.config.get("train", {})
        split = split_rows(
            len(dataset), train.get("val_fraction", 0.1), train.get("test_fraction", 0.1)
        )
        index = slice(split.test.start, min(split.test.stop, split.test.start + rows))
        dense_name, sparse_name = spec.input_names
        inputs = {
            dense_name: np.array(dataset.dense[index], dtype=np.float32),
            sparse_name: np.array(dataset.sparse[index], dtype=np.int64),
        }
        labels = np.array(dataset.labels[index])
        return HeldOut(inputs, labels, f"test split of {data}")
    inputs = spec.random_inputs(rows, np.random.default_rng(0))
    return HeldOut(inputs, None, "random valid inputs (data not found)")


@torch.no_grad()
def torch_probabilities(model: DLRM, inputs: dict[str, np.ndarray]) -> np.ndarray:
    dense, sparse = (torch.from_numpy(v) for v in inputs.values())
    return model.eval().probability(dense, sparse).numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@torch.no_grad()
def dequantized_copy(collapsed: DLRM) -> DLRM:
    """The collapsed model with every table replaced by its int8 round trip."""
    model = DLRM(collapsed.config, sparse=False)
    model.load_state_dict(collapsed.state_dict())
    for table in model.embeddings.tables:
        rows = table.table.weight.numpy()
        table.table.weight.copy_(torch.from_numpy(dequantize_rows(*quantize_rows(rows))))
    return model.eval()


@dataclass
class References:
    """PyTorch's answers on the parity rows: the trained model and what each variant holds."""

    trained: np.ndarray
    collapsed: np.ndarray
    dequantized: np.ndarray

    def for_variant(self, variant: str) -> tuple[np.ndarray, str]:
        if variant == "int8":
            return self.dequantized, "PyTorch, collapsed model with the int8 round trip of its rows"
        return self.collapsed, "PyTorch, collapsed model (float32)"


def pytorch_references(weights: RunWeights, inputs: dict[str, np.ndarray]) -> References:
    dense_name, sparse_name = list(inputs)
    model, remapped = weights.reference_model(inputs[sparse_name])
    local = {dense_name: inputs[dense_name], sparse_name: remapped}
    collapsed = model.collapsed()
    return References(
        trained=torch_probabilities(model, local),
        collapsed=torch_probabilities(collapsed, local),
        dequantized=torch_probabilities(dequantized_copy(collapsed), local),
    )


def file_entries(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


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


def accuracy_against(
    probabilities: np.ndarray, reference: np.ndarray, held: HeldOut, variant: str
) -> dict:
    """Max abs difference and AUC difference of a variant against the fp32 export."""
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
    else:
        figures["auc_note"] = "no labels for these rows: AUC not measured"
    return figures


class VariantExport:
    """One variant being staged: its folder, files, checks and manifest."""

    def __init__(self, base: str, variant: str, repo: Path, requested: bool) -> None:
        self.variant = variant
        self.name = model_name(base, variant)
        self.final = repo / self.name
        self.requested = requested
        self.staging = new_staging_directory(self.final)
        (self.staging / MODEL_VERSION).mkdir()
        self.problems: list[str] = []
        self.manifest: dict = {}
        self.probabilities: np.ndarray | None = None  # on the accuracy rows (CPU)

    @property
    def model_path(self) -> Path:
        file = "model.plan" if self.variant in TENSORRT_SOURCES else "model.onnx"
        return self.staging / MODEL_VERSION / file

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def export_run(run_path: str | Path, repo: str | Path, config: ExportConfig) -> ExportResult:
    """Export every variant of config.variants; the first one's result (see export_variants)."""
    return export_variants(run_path, repo, config).results[0]


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
    variants = parse_variants(config.variants)
    run = load_run(run_path)
    base = config.name or run.path.name
    for variant in variants:
        if not NAME_PATTERN.match(model_name(base, variant)):
            raise ValueError(f"model name {base!r} must be letters, digits, '_', '.' or '-'")
    skipped = engine_skips(variants)
    wanted = [v for v in variants if v not in skipped]
    if not wanted:
        raise ExportError(f"nothing to export: {'; '.join(sorted(set(skipped.values())))}")
    spec = spec_for(run.model_config.collapsed(), max_batch_size=config.max_batch_size)
    for variant in wanted:  # refuse what Triton would refuse before any work is done
        render_config(model_name(base, variant), spec)
    weights = RunWeights(run)
    stages: dict[str, VariantExport] = {}
    try:
        context = reference_context(run, weights, spec, config, log)
        onnx_variants = [v for v in ONNX_VARIANTS if v in onnx_sources(wanted)]
        for variant in onnx_variants + [v for v in wanted if v in TENSORRT_SOURCES]:
            stages[variant] = VariantExport(base, variant, Path(repo), variant in wanted)
        options = LoweringOptions(
            max_tensor_elements=config.max_tensor_elements,
            external_data_bytes=config.external_data_bytes,
            block_rows=config.block_rows,
        )
        log(f"lowering {', '.join(onnx_variants)} ({run.model_config.embedding_kind} tables)")
        targets = {v: stages[v].model_path for v in onnx_variants}
        lowered = lower_variants(weights, spec, targets, options)
        weights.close()
        for variant in onnx_variants:
            check_onnx_variant(stages[variant], lowered[variant], stages["fp32"], context)
        for variant in (v for v in wanted if v in TENSORRT_SOURCES):
            source = stages[TENSORRT_SOURCES[variant]]
            check_engine_variant(stages[variant], source, stages["fp32"], context)
        failures = [f"{s.name}: {p}" for s in stages.values() for p in s.problems]
        if failures:
            raise ExportError("exported models failed their checks:\n- " + "\n- ".join(failures))
        requested = [stages[v] for v in wanted]
        for stage in requested:
            finish_manifest(stage, time.perf_counter() - started)
        return ExportReport(install_all(requested, config.replace), skipped)
    finally:
        weights.close()
        for stage in stages.values():
            stage.discard()


def engine_skips(variants: tuple[str, ...]) -> dict[str, str]:
    """TensorRT variants that cannot be built on this machine, with the reason."""
    engines = [v for v in variants if v in TENSORRT_SOURCES]
    if not engines:
        return {}
    from mlet.tensorrt import unavailable_reason

    reason = unavailable_reason()
    return {} if reason is None else {v: reason for v in engines}


def onnx_sources(wanted: list[str]) -> set[str]:
    """ONNX variants to build: the wanted ones, fp32 (the accuracy reference) and the
    sources of wanted engines."""
    needed = {"fp32"} | {v for v in wanted if v in ONNX_VARIANTS}
    return needed | {TENSORRT_SOURCES[v] for v in wanted if v in TENSORRT_SOURCES}


@dataclass
class ExportContext:
    """What every variant's checks compare with."""

    run: Run
    spec: ExportSpec
    held: HeldOut
    references: References
    collapse_diff: float
    config: ExportConfig
    log: Callable[[str], None]


def reference_context(
    run: Run, weights: RunWeights, spec: ExportSpec, config: ExportConfig, log
) -> ExportContext:
    """Held-out rows and PyTorch's answers on them; refuses a collapse that changed the model."""
    held = held_out(run, spec, max(config.accuracy_rows, config.parity_rows))
    parity_inputs = held.head(config.parity_rows)
    log(f"PyTorch reference on {len(parity_inputs[spec.input_names[0]])} rows")
    references = pytorch_references(weights, parity_inputs)
    collapse_diff = max_abs_diff(references.trained, references.collapsed)
    if collapse_diff > spec.tolerance:
        raise ExportError(
            f"collapsed model differs from the trained one by {collapse_diff:.3g} "
            f"(tolerance {spec.tolerance:g})"
        )
    return ExportContext(run, spec, held, references, collapse_diff, config, log)


def install_all(stages: list[VariantExport], replace: bool) -> list[ExportResult]:
    """Decide every model's fate first (a refusal installs nothing), then install each."""
    statuses = [planned_status(stage, replace) for stage in stages]
    return [install(stage, status) for stage, status in zip(stages, statuses, strict=True)]


def check_onnx_variant(
    stage: VariantExport, lowered: LoweredModel, fp32: VariantExport, context: ExportContext
) -> None:
    """Structural checks, PyTorch parity on every provider, accuracy against fp32."""
    spec, held, config = context.spec, context.held, context.config
    variant_spec = spec_for(
        context.run.model_config.collapsed(), config.max_batch_size, stage.variant
    )
    path = stage.model_path
    stage.problems += check_onnx(path, spec)
    tensorrt = check_tensorrt_file(path, spec.max_batch_size)
    reference, reference_name = context.references.for_variant(stage.variant)
    parity_inputs = held.head(len(reference))
    providers, skipped = provider_parity(stage, parity_inputs, reference, variant_spec)
    if CPU not in providers or (stage is not fp32 and fp32.probabilities is None):
        return  # the failure is recorded; nothing further can be compared
    context.log(
        f"{stage.name}: parity with PyTorch "
        + ", ".join(f"{p} {d:.2e}" for p, d in providers.items())
    )
    stage.probabilities = onnxruntime_probabilities(path, held.inputs, spec.max_batch_size)
    accuracy = accuracy_against(stage.probabilities, fp32.probabilities, held, stage.variant)
    check_accuracy(stage, accuracy, config.max_auc_loss)
    stage.manifest = {
        "variant": stage.variant,
        "platform": "onnxruntime_onnx",
        "model_file": f"{MODEL_VERSION}/model.onnx",
        "spec": variant_spec.to_dict(),
        "opset": spec.opset,
        "parity": {
            "rows": len(reference),
            "rows_source": held.source,
            "reference": reference_name,
            "tolerance": variant_spec.tolerance,
            "collapse_max_abs_diff": context.collapse_diff,
            "onnxruntime_max_abs_diff": providers.get(CPU),
            "onnxruntime_providers": list(providers),
            "providers": providers,
            "providers_skipped": skipped,
        },
        "accuracy": accuracy,
        "weights": {
            "table_bytes": lowered.table_bytes,
            "external_data": lowered.external_data,
            "row_blocks": lowered.row_blocks,
        },
        "tensorrt_compatibility": {
            "compatible": not tensorrt,
            "problems": tensorrt[:20],
            "problem_count": len(tensorrt),
        },
    }
    stage.manifest |= source_fields(context.run)


def provider_parity(
    stage: VariantExport, inputs: dict, reference: np.ndarray, spec: ExportSpec
) -> tuple[dict[str, float], dict[str, str]]:
    """Max abs difference from PyTorch on each ONNX Runtime provider; CUDA where present."""
    providers, skipped = {}, {}
    for provider in (CPU, CUDA):
        reason = cuda_provider_reason() if provider == CUDA else None
        if reason is not None:
            skipped[provider] = reason
            continue
        try:
            got = onnxruntime_probabilities(stage.model_path, inputs, spec.max_batch_size, provider)
        except RuntimeError as e:
            if provider == CPU:  # every model must run here
                stage.problems.append(f"ONNX Runtime ({provider}) could not run it: {e}")
            else:
                skipped[provider] = str(e)
            continue
        providers[provider] = max_abs_diff(got, reference)
        if providers[provider] > spec.tolerance:
            stage.problems.append(
                f"ONNX Runtime ({provider}) differs from PyTorch by {providers[provider]:.3g} "
                f"(tolerance {spec.tolerance:g})"
            )
    return providers, skipped


def check_accuracy(stage: VariantExport, accuracy: dict, max_auc_loss: float) -> None:
    loss = -(accuracy["auc_difference"] or 0.0)
    if stage.variant != "fp32" and loss > max_auc_loss:
        stage.problems.append(
            f"loses {loss:.4f} test AUC against fp32 (at most {max_auc_loss:g} allowed)"
        )


def check_engine_variant(
    stage: VariantExport, source: VariantExport, fp32: VariantExport, context: ExportContext
) -> None:
    """Build the engine from the staged ONNX, run it, compare with ONNX Runtime."""
    from mlet.tensorrt import BatchProfile, EngineBuildError, build_engine

    spec, held, config = context.spec, context.held, context.config
    if source.probabilities is None or fp32.probabilities is None:
        stage.problems.append(f"not built: {source.name} failed its checks")
        return
    incompatible = source.manifest["tensorrt_compatibility"]["problems"]
    if incompatible:
        stage.problems += [f"{source.name} is not TensorRT-compatible: {p}" for p in incompatible]
        return
    profile = BatchProfile(*spec.batch_profile())
    shapes = {t.name: t.shape for t in spec.inputs}
    try:
        build = build_engine(source.model_path, stage.model_path, shapes, profile)
    except EngineBuildError as e:
        stage.problems.append(str(e))
        return
    context.log(f"{stage.name}: engine built in {build['build_seconds']:.1f}s")
    stage.probabilities = tensorrt_probabilities(stage.model_path, held.inputs, profile.max)
    tolerance = source.manifest["spec"]["tolerance"]
    runtime_diff = max_abs_diff(stage.probabilities, source.probabilities)
    if runtime_diff > tolerance:
        stage.problems.append(
            f"TensorRT differs from ONNX Runtime on {source.name} by {runtime_diff:.3g} "
            f"(tolerance {tolerance:g})"
        )
    accuracy = accuracy_against(stage.probabilities, fp32.probabilities, held, stage.variant)
    check_accuracy(stage, accuracy, config.max_auc_loss)
    stage.manifest = {
        "variant": stage.variant,
        "platform": "tensorrt_plan",
        "model_file": f"{MODEL_VERSION}/model.plan",
        "spec": source.manifest["spec"],
        "opset": spec.opset,
        "engine": build
        | {"source_model": source.name, "source_files": file_entries(source.staging)},
        "parity": {
            "rows": len(stage.probabilities),
            "rows_source": held.source,
            "reference": f"ONNX Runtime ({CPU}) on {source.name}",
            "tolerance": tolerance,
            "tensorrt_max_abs_diff": runtime_diff,
            "runtimes": ["TensorRT"],
        },
        "accuracy": accuracy,
    }
    stage.manifest |= source_fields(context.run)


def source_fields(run: Run) -> dict:
    return {
        "source_run": str(run.path.resolve()),
        "source_metrics": run.metrics.get("test", {}),
        "model": model_summary(run),
    }


def finish_manifest(stage: VariantExport, seconds: float) -> None:
    """Write config.pbtxt and manifest.json into the staging folder."""
    spec = ExportSpec.from_dict(stage.manifest["spec"])
    platform = stage.manifest["platform"]
    transform = stage.manifest["model"]["dense_transform"]
    config = render_config(stage.name, spec, platform, dense_transform=transform)
    (stage.staging / CONFIG_FILE).write_text(config)
    files = file_entries(stage.staging)
    stage.manifest = {
        "name": stage.name,
        "version": MODEL_VERSION,
        **stage.manifest,
        "files": files,
        "model_bytes": sum(
            f["bytes"] for p, f in files.items() if p.startswith(f"{MODEL_VERSION}/")
        ),
        "export_seconds": seconds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": software_versions(),
    }
    write_json(stage.staging / MANIFEST_FILE, stage.manifest)


def planned_status(stage: VariantExport, replace: bool) -> str:
    """What installing would do; refuses before anything is installed."""
    if not stage.final.exists():
        return "written"
    existing = stage.final / MANIFEST_FILE
    if existing.is_file() and same_model(read_json(existing), stage.manifest):
        return "unchanged"
    if not replace:
        raise FileExistsError(
            f"{stage.final} already holds a different model; choose another --name "
            "or pass --replace to replace it"
        )
    return "replaced"


def same_model(existing: dict, new: dict) -> bool:
    """Identical files; for an engine (whose bytes vary from build to build), the same
    source model, TensorRT version and spec."""
    new = json.loads(json.dumps(new))  # tuples become lists, as in the file read back
    if new.get("platform") == "tensorrt_plan":
        keys = ("source_files", "tensorrt", "profile")
        old_engine, new_engine = existing.get("engine", {}), new["engine"]
        return existing.get("spec") == new["spec"] and all(
            old_engine.get(k) == new_engine[k] for k in keys
        )
    return existing.get("files") == new["files"]


def install(stage: VariantExport, status: str) -> ExportResult:
    """Put the staged model in place (or keep the identical one already there)."""
    if status == "unchanged":
        manifest = read_json(stage.final / MANIFEST_FILE)
    else:
        install_directory(stage.staging, stage.final, replace=status == "replaced")
        manifest = stage.manifest
    return ExportResult(name=stage.name, path=stage.final, manifest=manifest, status=status)


def result_line(result: ExportResult) -> str:
    """One line per exported model for the command line."""
    manifest = result.manifest
    parity, accuracy = manifest["parity"], manifest["accuracy"]
    line = (
        f"{result.status} {result.path}: {manifest['variant']}, {manifest['model_bytes']:,} bytes"
    )
    if "tensorrt_max_abs_diff" in parity:
        line += f", TensorRT vs ONNX Runtime max abs diff {parity['tensorrt_max_abs_diff']:.2e}"
    else:
        line += (
            f", collapse max abs diff {parity['collapse_max_abs_diff']:.2e}, ONNX Runtime max "
            f"abs diff {parity['onnxruntime_max_abs_diff']:.2e}"
        )
    if manifest["variant"] != "fp32":
        line += f", vs fp32 {accuracy['max_abs_diff']:.2e}"
        if accuracy["auc_difference"] is not None:
            line += f", AUC {accuracy['auc_difference']:+.5f}"
    return line
