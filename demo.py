"""The main job: the whole pipeline on the built-in synthetic default, with one report.

synthetic data -> full-width baseline (d=16) and MLET (d=4, k=64) trained -> both
collapsed and exported to ONNX -> both load-tested -> report.md comparing them.
Every step writes its artifact under --out and is skipped when that artifact is already
there, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadConfig, run_load
from export.exporter import ExportConfig, export_run
from mlet.data.dataset import DataSchema
from mlet.data.synthetic import SyntheticConfig, generate
from mlet.files import read_json
from train.trainer import TrainConfig, train_run


@dataclass(frozen=True)
class DemoModel:
    name: str
    embedding: str
    dim: int
    hidden: int | None = None


BASELINE = DemoModel("full-d16", "full", 16)
COMPRESSED = DemoModel("mlet-d4-k64", "mlet", 4, 64)


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    rows: int = 500_000
    seed: int = 0
    epochs: int = 5
    users: int = 16
    duration: float = 15.0
    models: tuple[DemoModel, ...] = (BASELINE, COMPRESSED)


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
    manifests = {}
    for name, run in runs.items():
        step(f"export {name}: collapse, ONNX, parity checks")
        result = export_run(run, repo, ExportConfig(name=name))
        manifests[name] = result.manifest
        print(f"{result.status} {result.path}")
    step("load test: each model in its own server process")
    load = LoadConfig(users=config.users, duration=config.duration)
    summaries = run_load(repo, list(runs), load, config.out / "results")
    report = config.out / "report.md"
    report.write_text(demo_report(config, runs, manifests, summaries, load))
    return report


def demo_report(
    config: DemoConfig,
    runs: dict[str, Path],
    manifests: dict[str, dict],
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
            f"| {model.name} | {model.embedding} | {model.dim} | {model.hidden or '-'} "
            f"| {metrics['test']['auc']:.4f} | {metrics['test']['logloss']:.4f} "
            f"| {manifest['model']['embedding_bytes_inference']:,} "
            f"| {manifest['model_bytes']:,} | {served['p50_ms']:.1f} | {served['p99_ms']:.1f} "
            f"| {served['requests_per_s']:.1f} | {served['failures']} "
            f"| {served['server_rss_bytes'] / 2**20:.1f} |"
        )
    base, small = (manifests[m.name] for m in (BASELINE, COMPRESSED))
    base_auc, small_auc = (
        read_json(runs[m.name] / "metrics.json")["test"]["auc"] for m in (BASELINE, COMPRESSED)
    )
    base_load, small_load = (load_by_model[m.name] for m in (BASELINE, COMPRESSED))
    embedding_ratio = (
        base["model"]["embedding_bytes_inference"] / small["model"]["embedding_bytes_inference"]
    )
    parity = [
        f"| {name} | {m['parity']['collapse_max_abs_diff']:.2e} "
        f"| {m['parity']['onnxruntime_max_abs_diff']:.2e} | {m['parity']['rows']} |"
        for name, m in manifests.items()
    ]
    return "\n".join(
        [
            "# MLET demo report",
            "",
            f"Synthetic data: {config.rows:,} rows (80/10/10 train/val/test split), seed "
            f"{config.seed}. Load: {load.users} users, 1-row JSON requests, "
            f"{load.duration:g} s per model, one server process per model, on this machine.",
            "",
            "| model | embedding | d | k | test AUC | test logloss | embedding bytes "
            "| ONNX bytes | p50 ms | p99 ms | requests/s | failures | server RSS MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"- Embedding bytes: {BASELINE.name} / {COMPRESSED.name} = {embedding_ratio:.2f}x.",
            f"- ONNX bytes: {base['model_bytes'] / small['model_bytes']:.2f}x.",
            f"- Test AUC: {COMPRESSED.name} - {BASELINE.name} = {small_auc - base_auc:+.4f}.",
            f"- Requests/s: {COMPRESSED.name} / {BASELINE.name} = "
            f"{small_load['requests_per_s'] / base_load['requests_per_s']:.2f}x; p99 "
            f"{small_load['p99_ms'] / base_load['p99_ms']:.2f}x.",
            "",
            "Parity on held-out rows (max abs difference of probabilities):",
            "",
            "| model | collapsed vs trained | ONNX Runtime vs PyTorch | rows |",
            "|---|---:|---:|---:|",
            *parity,
            "",
            f"AUC figures come from one seed and a short budget (early stopping on validation "
            f"AUC, at most {config.epochs} epochs): they show the pipeline, not a width study.",
            "",
        ]
    )
