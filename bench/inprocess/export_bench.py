"""`mlet bench export`: exporting a Criteo-Kaggle-sized MLET model, and serving it.

1. Writes a run folder whose model has Criteo Kaggle's 26 table sizes (33.8 million rows)
   as MLET tables (K=64 -> D=16 by default), randomly initialised as training would start
   (no training), without ever holding a table: W1 alone is 8.6 GB.
2. Runs `mlet export` on it as a child process, measuring the wall time and the peak
   resident memory: the kernel's high-water mark (getrusage RUSAGE_CHILDREN ru_maxrss) and
   a 10 Hz sample of the child's anonymous and file-backed resident pages.
3. Loads the exported model in a fresh ONNX Runtime session in another child process:
   load time, and resident memory after load and after warm-up batches.

`mlet bench int8-mlp` measures whether quantizing the MLPs of an int8 model (ONNX
Runtime's dynamic quantization of its MatMuls) makes it faster here, and what it costs.

This stage never imports export/: it runs the `mlet` command and reads what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from mlet.files import staged_directory, write_json
from mlet.markdown import markdown_table
from mlet.repository import open_model
from mlet.runtime import onnxruntime_session
from mlet.weights import SafetensorsWriter

# Rows of Criteo Kaggle's 26 categorical features (33,762,577 in all) after DLRM's
# preprocessing, as listed in MLCommons inference, recommendation/dlrm/pytorch/python/main.py
# ("Criteo Kaggle Display Advertisement Challenge Dataset", ln_emb); the same counts appear
# as KAGGLE_NUM_EMBEDDINGS_PER_FEATURE in TorchRec-based DLRM examples.
KAGGLE_TABLE_SIZES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
KAGGLE_DENSE = 13


@dataclass
class ExportBenchConfig:
    work: Path = Path(tempfile.gettempdir()) / "mlet-export-bench"
    dim: int = 16
    hidden: int = 64
    variants: tuple[str, ...] = ("fp32",)
    table_sizes: tuple[int, ...] = KAGGLE_TABLE_SIZES
    warmup_batches: int = 20
    batch: int = 256
    keep: bool = False  # keep the checkpoint and the exported models
    seed: int = 0
    name: str = "kaggle"  # the model's name in work/models; its variants get suffixes


def write_random_mlet_run(
    folder: Path, table_sizes: tuple[int, ...], dim: int, hidden: int, seed: int = 0
) -> Path:
    """A run folder with a freshly initialised MLET DLRM, written tables block by block.

    Initialisation follows MultiLayerEmbedding (in NumPy, a block of rows at a time); the
    MLPs are PyTorch's default Linear initialisation.
    """
    import torch

    from mlet.dataset import DataSchema
    from mlet.dlrm import build_config, build_mlps, table_key
    from mlet.embeddings import PROJECTION_STD, init_bound
    from mlet.run import CONFIG_FILE, WEIGHTS_FILE

    torch.manual_seed(seed)
    config = build_config(KAGGLE_DENSE, list(table_sizes), "mlet", dim, hidden)
    bottom, top = build_mlps(config)
    dense = {f"bottom.{k}": v for k, v in bottom.state_dict().items()}
    dense |= {f"top.{k}": v for k, v in top.state_dict().items()}
    layout = {name: (np.float32, tuple(v.shape)) for name, v in dense.items()}
    for index, table in enumerate(config.tables):
        layout[table_key(index, "projection")] = (np.float32, (dim, hidden))
        layout[table_key(index, "table")] = (np.float32, (table.rows, hidden))
    rng = np.random.default_rng(seed)
    with staged_directory(folder) as staging:
        with SafetensorsWriter(staging / WEIGHTS_FILE, layout, {"format": "mlet-run-v1"}) as out:
            for name, value in dense.items():
                out.write(name, value.numpy())
            for index, table in enumerate(config.tables):
                projection = rng.normal(0.0, PROJECTION_STD, size=(dim, hidden))
                out.write(table_key(index, "projection"), projection.astype(np.float32))
                bound = init_bound(table.rows)
                for start in range(0, table.rows, 1 << 18):
                    rows = min(table.rows, start + (1 << 18)) - start
                    block = rng.random((rows, hidden), dtype=np.float32)
                    out.write(table_key(index, "table"), (2 * block - 1) * bound)
        schema = DataSchema(
            num_dense=KAGGLE_DENSE,
            table_sizes=tuple(table_sizes),
            source={"kind": "none: random initialisation for the export benchmark"},
        )
        write_json(
            staging / CONFIG_FILE,
            {"data": "", "schema": schema.to_dict(), "model": config.to_dict(), "seed": seed},
        )
    return folder


def process_memory(pid: int) -> dict[str, int]:
    """Resident bytes of a process: total, anonymous and file-backed (from /proc)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    memory = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                memory[fields[key]] = int(value.split()[0]) * 1024
    return memory


def measure_child(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `command`; wall seconds, its own peak RSS (ru_maxrss) and the sampled RSS split.

    os.wait4 gives the resource usage of this child alone: RUSAGE_CHILDREN would report the
    largest high-water mark of every child this process ever waited for.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks
        child = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
        )
        peak = {"rss": 0, "anon": 0, "file": 0}
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                sample = process_memory(child.pid)
                peak = {k: max(peak[k], sample.get(k, 0)) for k in peak}
            time.sleep(0.1)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{output}")
    return {
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "sampled_peak": peak,
        "output": output,
    }


def probe_session(model_folder: Path, batch: int, warmup_batches: int) -> dict:
    """Load a model in ONNX Runtime (this process) and report time and resident memory."""
    opened = open_model(model_folder)
    spec = opened.manifest.spec
    baseline = process_memory(psutil.Process().pid)
    started = time.perf_counter()
    session = onnxruntime_session(opened.model_path)
    load_seconds = time.perf_counter() - started
    loaded = process_memory(psutil.Process().pid)
    rng = np.random.default_rng(0)
    latencies = []
    for _ in range(warmup_batches):
        inputs = spec.random_inputs(batch, rng)
        started = time.perf_counter()
        session.run(None, inputs)
        latencies.append(time.perf_counter() - started)
    warm = process_memory(psutil.Process().pid)
    return {
        "load_seconds": load_seconds,
        "baseline": baseline,
        "after_load": loaded,
        "after_warmup": warm,
        "warmup_batches": warmup_batches,
        "batch": batch,
        "median_batch_ms": 1000 * float(np.median(latencies)),
    }


def named_models(repo: Path, name: str, variants: tuple[str, ...]) -> list[Path]:
    """The folders `mlet export --name NAME --variants ...` writes: NAME, NAME-int8, ..."""
    names = [name if variant == "fp32" else f"{name}-{variant}" for variant in variants]
    return [repo / n for n in names if (repo / n).is_dir()]


def remove_models(repo: Path, name: str, variants: tuple[str, ...]) -> None:
    """Remove those folders, and the repository once nothing else is in it."""
    for folder in named_models(repo, name, variants):
        shutil.rmtree(folder)
    if repo.is_dir() and not any(repo.iterdir()):
        repo.rmdir()


def collapsed_fp32_bytes(table_sizes: tuple[int, ...], dim: int) -> int:
    return 4 * dim * sum(table_sizes)


def run_export_bench(config: ExportBenchConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run = config.work / f"kaggle-mlet-d{config.dim}-k{config.hidden}"
    repo = config.work / "models"
    report: dict = {"config": {k: str(v) for k, v in asdict(config).items()}}
    try:
        if not (run / "model.safetensors").is_file():
            started = time.perf_counter()
            print(f"writing a random MLET checkpoint to {run} ...", flush=True)
            write_random_mlet_run(run, config.table_sizes, config.dim, config.hidden, config.seed)
            report["checkpoint_seconds"] = time.perf_counter() - started
        report["checkpoint_bytes"] = (run / "model.safetensors").stat().st_size
        # Only this name's models: another size's models stay in work/models, to compare with.
        remove_models(repo, config.name, config.variants)
        command = [sys.executable, "-m", "cli", "export", str(run), "--repo", str(repo),
                   "--name", config.name, "--variants", ",".join(config.variants)]  # fmt: skip
        print("running " + " ".join(command[2:]), flush=True)
        export = measure_child(command)
        report["export"] = export
        collapsed = collapsed_fp32_bytes(config.table_sizes, config.dim)
        report["collapsed_fp32_bytes"] = collapsed
        if export["peak_rss_bytes"]:
            report["peak_rss_over_collapsed"] = export["peak_rss_bytes"] / collapsed
        report["models"] = {}
        for folder in named_models(repo, config.name, config.variants):
            manifest = open_model(folder).manifest
            probe = subprocess.run(
                [sys.executable, "-c", PROBE_SCRIPT, str(folder), str(config.batch),
                 str(config.warmup_batches)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            report["models"][folder.name] = {
                "variant": manifest.variant,
                "model_bytes": manifest.model_bytes,
                "external_data": (manifest.weights or {}).get("external_data"),
                "row_blocks": (manifest.weights or {}).get("row_blocks"),
                "parity": manifest.parity,
                "session": json.loads(probe.stdout),
            }
    finally:
        if not config.keep:
            remove_models(repo, config.name, config.variants)
            shutil.rmtree(run, ignore_errors=True)
    write_json(out / "export.json", report)
    (out / "export.md").write_text(export_markdown(report))
    return report


PROBE_SCRIPT = (
    "import json, sys; from pathlib import Path; "
    "from bench.inprocess.export_bench import probe_session; "
    "print(json.dumps(probe_session(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))"
)


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def export_markdown(report: dict) -> str:
    export = report["export"]
    config = report["config"]
    rows = [int(n) for n in config["table_sizes"].strip("()").split(",") if n.strip()]
    kaggle = " (Criteo Kaggle's)" if tuple(rows) == KAGGLE_TABLE_SIZES else ""
    lines = [
        f"# Export benchmark: MLET K={config['hidden']} -> D={config['dim']}, random weights",
        "",
        f"- tables{kaggle}: {len(rows)}, {sum(rows):,} rows",
        f"- checkpoint: {report['checkpoint_bytes'] / 2**30:.2f} GiB"
        + (
            f" (written in {report['checkpoint_seconds']:.0f} s, so much of it sits in the page"
            " cache)"
            if "checkpoint_seconds" in report
            else ""
        ),
        f"- collapsed fp32 tables: {report['collapsed_fp32_bytes'] / 2**30:.2f} GiB",
        f"- `mlet export` wall time: {export['seconds']:.1f} s",
        f"- peak resident memory (ru_maxrss): {mib(export['peak_rss_bytes'])}"
        + (
            f", {report['peak_rss_over_collapsed']:.2f}x the collapsed fp32 bytes"
            if "peak_rss_over_collapsed" in report
            else ""
        ),
        f"- sampled peak: anonymous {mib(export['sampled_peak']['anon'])}, file-backed "
        f"{mib(export['sampled_peak']['file'])} (mapped model data counts as resident)",
        "",
    ]
    header = ["model", "variant", "bytes", "ORT load s", "RSS after load",
              "after warm-up (anon + file)", "batch ms"]  # fmt: skip
    rows = []
    for name, model in report["models"].items():
        session = model["session"]
        warm = session["after_warmup"]
        rows.append(
            [name, model["variant"], f"{model['model_bytes']:,}", f"{session['load_seconds']:.2f}",
             mib(session["after_load"]["rss"]),
             f"{mib(warm['rss'])} ({mib(warm['anon'])} + {mib(warm['file'])})",
             f"{session['median_batch_ms']:.1f}"]
        )  # fmt: skip
    lines.append(markdown_table(header, rows, "llrrrrr"))
    lines += ["", "Export output:", "", "```", export["output"].strip(), "```", ""]
    return "\n".join(lines)


def with_float32_mlp_weights(model):
    """The graph with its float16-stored MLP weights (int8, int4) cast up in the file, as
    ONNX Runtime folds them on load, so that each MLP MatMul reads an initializer again."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    stored = {t.name: t for t in graph.initializer if t.name.startswith(("bottom.", "top."))}
    renamed, kept = {}, []
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in stored:
            tensor = stored[node.input[0]]
            wide = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(wide, tensor.name))
            renamed[node.output[0]] = tensor.name
        else:
            kept.append(node)
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    return model


def quantize_mlps(model_path: Path, out_path: Path) -> list[str]:
    """Dynamic int8 quantization of the MLP MatMuls only (not the interaction's)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = with_float32_mlp_weights(onnx.load(str(model_path)))
    wide_path = out_path.with_name("float32-mlps.onnx")
    onnx.save(model, str(wide_path))
    graph = model.graph
    nodes = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1].startswith(("bottom.", "top."))
    ]
    quantize_dynamic(
        str(wide_path),
        str(out_path),
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        weight_type=QuantType.QInt8,
    )
    return nodes


def time_session(session, inputs: dict[str, np.ndarray], iterations: int) -> float:
    """Median milliseconds of one run."""
    session.run(None, inputs)
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def run_int8_mlp_bench(
    repo: Path, model: str, out: Path, batches=(1, 64, 1024), iterations: int = 200, rounds: int = 3
) -> dict:
    """The int8 model with float32 MLPs against the same with dynamically quantized MLPs."""
    opened = open_model(Path(repo) / model)
    spec = opened.manifest.spec
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "model.onnx"
        nodes = quantize_mlps(opened.model_path, quantized)
        sessions = {
            "float32 MLPs": onnxruntime_session(opened.model_path),
            "int8 MLPs (dynamic)": onnxruntime_session(quantized),
        }
        inputs = spec.random_inputs(max(batches), np.random.default_rng(0))
        outputs = {name: s.run(None, inputs)[0] for name, s in sessions.items()}
        timings: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in sessions}
        for _ in range(rounds):  # interleaved, so that drift of the machine hits both alike
            for batch in batches:
                chunk = {k: v[:batch] for k, v in inputs.items()}
                for name, session in sessions.items():
                    timings[name][batch].append(time_session(session, chunk, iterations))
    a, b = outputs.values()
    report = {
        "model": model,
        "quantized_nodes": nodes,
        "max_abs_diff": float(np.max(np.abs(a.astype(np.float64) - b))),
        "median_ms": {
            n: {str(k): float(np.median(v)) for k, v in t.items()} for n, t in timings.items()
        },
        "rounds": rounds,
        "iterations": iterations,
    }
    write_json(out / "int8_mlp.json", report)
    lines = [
        f"# {model}: float32 against dynamically quantized int8 MLPs (ONNX Runtime, CPU)",
        "",
        f"MatMuls quantized: {len(nodes)}; max abs difference of probabilities on "
        f"{max(batches)} random rows: {report['max_abs_diff']:.2e}",
        "",
        markdown_table(
            ["MLPs", *(f"batch {b} ms" for b in batches)],
            [
                [name, *(f"{medians[str(b)]:.3f}" for b in batches)]
                for name, medians in report["median_ms"].items()
            ],
            "l" + "r" * len(batches),
        ),  # fmt: skip
    ]
    (out / "int8_mlp.md").write_text("\n".join(lines) + "\n")
    return report
