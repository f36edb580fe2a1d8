"""The main job: the whole pipeline on the built-in synthetic default, with one report.

synthetic data -> full-width baseline (d=16), MLET (d=4, k=64) and a full table at MLET's
width (d=4) trained -> collapsed and exported to ONNX -> load-tested -> report.md.
Every step writes its artifact under --out and is skipped when that artifact is already
there, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.load.load_test import LoadConfig, run_load
from data.synthetic import SyntheticConfig, generate
from export.exporter import ExportConfig, export_variants
from mlet.dataset import DataSchema
from mlet.files import read_json
from mlet.markdown import markdown_table
from mlet.repository import Manifest
from train.trainer import TrainConfig, train_run


@dataclass(frozen=True)
class DemoModel:
    name: str
    embedding: str
    dim: int
    hidden: int | None = None


BASELINE = DemoModel("full-d16", "full", 16)
COMPRESSED = DemoModel("mlet-d4-k64", "mlet", 4, 64)
SAME_WIDTH = DemoModel("full-d4", "full", 4)  # the control: a plain table at MLET's width


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    rows: int = 500_000
    seed: int = 0
    epochs: int = 5
    users: int = 16
    duration: float = 15.0
    models: tuple[DemoModel, ...] = (BASELINE, COMPRESSED, SAME_WIDTH)
    variants: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def ensure_data(config: DemoConfig) -> Path:
    data = config.out / "data"
    synthetic = SyntheticConfig(rows=config.rows, seed=config.seed)
    if (data / "schema.json").is_file():
        source = DataSchema.from_dict(read_json(data / "schema.json")).source
        if source.get("rows") == config.rows and source.get("seed") == config.seed:
            step(f"data: reusing {data}")
            return data
        raise FileExistsError(
            f"{data} holds a dataset of another size or seed; use another --out or remove it"
        )
    step(f"data: synthesising {config.rows:,} rows into {data}")
    generate(synthetic, data)
    return data


def ensure_run(config: DemoConfig, data: Path, model: DemoModel) -> Path:
    run = config.out / "runs" / model.name
    if (run / "metrics.json").is_file():
        step(f"train {model.name}: reusing {run}")
        return run
    step(f"train {model.name}: {model.embedding} embeddings, d={model.dim}, k={model.hidden}")
    train_config = TrainConfig(
        embedding=model.embedding,
        dim=model.dim,
        hidden=model.hidden,
        epochs=config.epochs,
        seed=config.seed,
    )
    train_run(data, run, train_config)
    return run


def run_demo(config: DemoConfig) -> Path:
    """Run every stage and return the path of the report."""
    data = ensure_data(config)
    runs = {m.name: ensure_run(config, data, m) for m in config.models}
    repo = config.out / "models"
    manifests, variants = {}, {}
    for name, run in runs.items():
        step(f"export {name}: collapse, ONNX ({', '.join(config.variants)}), checks")
        export = ExportConfig(name=name, variants=config.variants)
        for result in export_variants(run, repo, export).results:
            variants[result.name] = result.manifest
            print(f"{result.status} {result.path}")
        manifests[name] = variants[name]
    step("load test: each model in its own server process")
    load = LoadConfig(users=config.users, duration=config.duration)
    summaries = run_load(repo, list(runs), load, config.out / "results")
    report = config.out / "report.md"
    text = demo_report(config, runs, manifests, summaries, load) + "\n" + variants_table(variants)
    report.write_text(text)
    return report


def variants_table(manifests: dict[str, Manifest]) -> str:
    """Bytes and accuracy of every exported variant against its fp32 export."""
    rows = []
    for name, m in manifests.items():
        auc, logloss = (m.accuracy.get(k) for k in ("auc_difference", "logloss_difference"))
        rows.append(
            [name, m.variant, f"{m.model_bytes:,}", f"{(m.weights or {}).get('table_bytes', 0):,}",
             f"{m.accuracy.get('max_abs_diff', 0.0):.2e}",
             "-" if auc is None else f"{auc:+.6f}", "-" if logloss is None else f"{logloss:+.6f}"]
        )  # fmt: skip
    header = ["model", "variant", "bytes", "table bytes", "max abs diff", "AUC difference",
              "log loss difference"]  # fmt: skip
    return (
        "Exported variants, each against its fp32 export on held-out test rows:\n\n"
        + markdown_table(header, rows, "llrrrrr")
        + "\n"
    )


def demo_report(
    config: DemoConfig,
    runs: dict[str, Path],
    manifests: dict[str, Manifest],
    summaries: list[dict],
    load: LoadConfig,
) -> str:
    load_by_model = {s["model"]: s for s in summaries}
    rows = []
    for model in config.models:
        metrics = read_json(runs[model.name] / "metrics.json")
        manifest = manifests[model.name]
        served = load_by_model[model.name]
        rows.append(
            [model.name, model.embedding, str(model.dim), str(model.hidden or "-"),
             f"{metrics['test']['auc']:.4f}", f"{metrics['test']['logloss']:.4f}",
             f"{manifest.embedding_bytes:,}", f"{manifest.model_bytes:,}",
             f"{served['p50_ms']:.1f}", f"{served['p99_ms']:.1f}",
             f"{served['requests_per_s']:.1f}", str(served["failures"]),
             f"{served['server_rss_bytes'] / 2**20:.1f}"]
        )  # fmt: skip
    header = ["model", "embedding", "d", "k", "test AUC", "test logloss", "embedding bytes",
              "ONNX bytes", "p50 ms", "p99 ms", "requests/s", "failures",
              "server RSS MiB"]  # fmt: skip
    parity = [
        [name, f"{m.parity['collapse_max_abs_diff']:.2e}",
         f"{m.parity['onnxruntime_max_abs_diff']:.2e}", str(m.parity["rows"])]
        for name, m in manifests.items()
    ]  # fmt: skip
    parity_header = ["model", "collapsed vs trained", "ONNX Runtime vs PyTorch", "rows"]
    return "\n".join(
        [
            "# MLET demo report",
            "",
            f"Synthetic data: {config.rows:,} rows (80/10/10 train/val/test split), seed "
            f"{config.seed}. Load: {load.users} users, 1-row JSON requests, "
            f"{load.duration:g} s per model, one server process per model, on this machine.",
            "",
            markdown_table(header, rows, "ll" + "r" * 11),
            "",
            *(
                line
                for other in config.models
                if other != COMPRESSED
                for line in comparison(COMPRESSED.name, other.name, runs, manifests, load_by_model)
            ),
            "Parity on held-out rows (max abs difference of probabilities):",
            "",
            markdown_table(parity_header, parity, "lrrr"),
            "",
            f"AUC figures come from one seed and a short budget (early stopping on validation "
            f"AUC, at most {config.epochs} epochs): they show the pipeline, not a width study.",
            "",
        ]
    )


def comparison(
    name: str, other: str, runs: dict, manifests: dict, load_by_model: dict
) -> list[str]:
    """Ratios of model `name` against model `other`, as report bullet points."""
    a, b = manifests[name], manifests[other]
    auc_a, auc_b = (read_json(runs[m] / "metrics.json")["test"]["auc"] for m in (name, other))
    load_a, load_b = load_by_model[name], load_by_model[other]
    embedding = a.embedding_bytes, b.embedding_bytes
    sizes = (
        f"- embedding bytes {embedding[1] / embedding[0]:.2f}x smaller, ONNX file "
        f"{b.model_bytes / a.model_bytes:.2f}x smaller;"
        if embedding[0] != embedding[1]
        else "- the same embedding bytes (the same width);"
    )
    return [
        f"{name} against {other}:",
        sizes,
        f"- test AUC {auc_a - auc_b:+.4f};",
        f"- requests/s {load_a['requests_per_s'] / load_b['requests_per_s']:.2f}x, p99 "
        f"{load_a['p99_ms'] / load_b['p99_ms']:.2f}x.",
        "",
    ]
