"""`mlet bench scale`: compressed against uncompressed at Criteo Kaggle's table sizes, served.

1. Build, one run at a time so that one large model is in memory at once: `mlet data
   synth` writes data with the 26 table sizes; `mlet train` (TorchRec) trains full d=64,
   full d=16 and MLET k=64 -> d=16 for one short pass on it; `mlet export` streams each
   into one repository (parity and accuracy checked as in every export), and the run's
   checkpoint is deleted. A model already in the repository with these tables is reused.
2. Serve each model alone, on each engine in turn: seconds from process start to ready
   and to the first answer (the model files dropped from the page cache first); a uniform
   warm-up that touches every row of every table; resident memory, and the model files'
   resident pages from /proc/PID/smaps (ONNX Runtime maps external data, so RSS alone
   misleads); then each load (ids x rows per request, HTTP binary) for `seconds` with wrk,
   the server's RSS sampled for its peak.
3. Report: scale.json (one row per engine, model, ids and rows per request, exactly the
   keys of SCALE_KEYS), scale-details.json (everything else), scale.md and scale.html.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from bench.environment import environment
from bench.inprocess.export_bench import KAGGLE_TABLE_SIZES, measure_child
from bench.inprocess.train_bench import mlet_command, synth
from bench.load.engines import run_wrk, wrk_missing_reason
from bench.load.ids import ID_KINDS, fit_zipf_on_dataset, id_samplers
from bench.load.load_test import WARM_UP_TIMEOUT_S, children_cpu_seconds
from bench.load.request_bodies import RequestFactory, encode_inputs
from bench.load.servers import ENGINES, Engine, ProcessTree, running_engine
from mlet.files import read_json, write_json
from mlet.infer_request import http_infer
from mlet.repository import open_model

# run name -> (embedding, D, K): what `mlet train` trains
RUNS = {
    "full-d64": ("full", 64, None),
    "full-d16": ("full", 16, None),
    "mlet-d16-k64": ("mlet", 16, 64),
}
# model name -> (run it is exported from, variant)
MODELS = {
    "full-d64": ("full-d64", "fp32"),
    "full-d16": ("full-d16", "fp32"),
    "mlet-d16-k64": ("mlet-d16-k64", "fp32"),
    "mlet-d16-k64-fp16": ("mlet-d16-k64", "fp16"),
    "mlet-d16-k64-int8": ("mlet-d16-k64", "int8"),
    "mlet-d16-k64-int4": ("mlet-d16-k64", "int4"),
}
SCALE_KEYS = (
    "engine", "variant", "ids", "rows_per_request", "disk_bytes", "ready_s", "rss_bytes",
    "peak_rss_bytes", "model_resident_bytes", "requests_per_s", "rows_per_s", "p50_ms",
    "p99_ms", "p999_ms",
)  # fmt: skip
ZIPF_EXPONENT = 1.05  # the load tests' default where no log is given to fit one on
QUICK_SCALE = 100  # --quick divides every table by this
SERVING_OVERHEAD_BYTES = 1 << 30  # a server's own memory beside its model (Triton: two processes)
TRAINING_FACTOR = 1.25  # peak RSS of `mlet train` over what it trains (measured: 1.07x)


@dataclass
class ScaleConfig:
    work: Path = Path(tempfile.gettempdir()) / "mlet-scale"
    engines: tuple[str, ...] = ENGINES
    variants: tuple[str, ...] = tuple(MODELS)
    ids: tuple[str, ...] = ("uniform", "zipf")
    rows_per_request: tuple[int, ...] = (1, 256)
    seconds: float = 10.0  # per load
    connections: int = 16
    zipf_exponent: float | None = None  # None: fitted on zipf_from, else ZIPF_EXPONENT
    zipf_from: Path | None = None  # a converted dataset whose largest table gives the exponent
    ids_from: Path | None = None  # a converted dataset whose id frequencies are replayed
    table_sizes: tuple[int, ...] = KAGGLE_TABLE_SIZES
    train_rows: int = 100_000  # rows of the generated data the runs train one pass on
    batch_size: int = 512
    warmup_rows: int = 4096  # rows per request of the warm-up that touches every row
    pool: int = 64  # distinct request bodies per load, the same for every engine and model
    tritonserver: str | None = None
    keep_runs: bool = False  # keep the training runs' checkpoints after export
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise ValueError(f"engines must be among {ENGINES}, got {list(self.engines)}")
        unknown = [v for v in self.variants if v not in MODELS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be among {list(MODELS)}, got {list(self.variants)}")
        unknown = [i for i in self.ids if i not in ID_KINDS]
        if unknown or not self.ids:
            raise ValueError(f"ids must be among {ID_KINDS}, got {list(self.ids)}")
        if "dataset" in self.ids and self.ids_from is None:
            raise ValueError("dataset ids need --ids-from DATASET, a converted dataset")
        if self.seconds < 1 or self.connections < 1 or self.pool < 1:
            raise ValueError("seconds must be >= 1, connections and pool positive")
        if min(self.rows_per_request) < 1 or self.warmup_rows < 1:
            raise ValueError("rows per request must be positive")

    def runs(self) -> list[str]:
        """The runs the chosen models come from, in RUNS' order."""
        return [run for run in RUNS if any(MODELS[v][0] == run for v in self.variants)]


def quick_config(**options) -> ScaleConfig:
    """The same benchmark on tables QUICK_SCALE times smaller, with short loads."""
    sizes = tuple(max(2, n // QUICK_SCALE) for n in KAGGLE_TABLE_SIZES)
    defaults = {
        "table_sizes": sizes,
        "train_rows": 5000,
        "seconds": 2.0,
        "connections": 4,
        "pool": 8,
        "warmup_rows": 1024,
        "quick": True,
    }
    return ScaleConfig(**(defaults | options))


# -- what a run needs -----------------------------------------------------------------------


def table_bytes(table_sizes: tuple[int, ...], width: int) -> int:
    return 4 * width * sum(table_sizes)


def needs(config: ScaleConfig) -> dict:
    """Peak memory and disk a run of `config` needs, from its tables' sizes.

    Memory: the largest of training a run (its tables at their training width and row-wise
    optimizer state, times TRAINING_FACTOR) and serving a model (its fp32 tables and a
    server's own memory). Disk: every exported model (fp32 bounds each variant) and one
    training checkpoint at a time (all of them with keep_runs).
    """
    rows = sum(config.table_sizes)
    training, serving, checkpoints = {}, {}, {}
    for run in config.runs():
        _, dim, hidden = RUNS[run]
        checkpoints[run] = table_bytes(config.table_sizes, hidden or dim)
        training[run] = int(TRAINING_FACTOR * (checkpoints[run] + 4 * rows))
        serving[run] = table_bytes(config.table_sizes, dim) + SERVING_OVERHEAD_BYTES
    exported = sum(table_bytes(config.table_sizes, RUNS[MODELS[v][0]][1]) for v in config.variants)
    kept = sum(checkpoints.values()) if config.keep_runs else max(checkpoints.values())
    steps = {f"training {r}": b for r, b in training.items()}
    steps |= {f"serving {r}": b for r, b in serving.items()}
    largest = max(steps, key=steps.get)
    return {
        "memory_bytes": steps[largest],
        "memory_step": largest,
        "disk_bytes": exported + kept,
    }


def gib(value: float) -> str:
    return f"{value / 2**30:.1f} GiB"


def check_resources(need: dict, available_memory: int, free_disk: int, work: Path) -> None:
    """Refuse, before anything starts, a run this machine cannot hold."""
    if need["memory_bytes"] > available_memory:
        raise MemoryError(
            f"mlet bench scale needs about {gib(need['memory_bytes'])} of memory at its "
            f"largest step ({need['memory_step']}); this machine has {gib(available_memory)} "
            f"available. Choose fewer --variants (full-d64 is the largest) or --quick."
        )
    if need["disk_bytes"] > free_disk:
        raise OSError(
            f"mlet bench scale needs about {gib(need['disk_bytes'])} of disk in {work}; "
            f"{gib(free_disk)} are free there. Point --work at a larger disk."
        )


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


# -- building the models ----------------------------------------------------------------------


def model_is_built(folder: Path, table_sizes: tuple[int, ...]) -> bool:
    """A complete exported model of these tables (anything else is rebuilt)."""
    try:
        spec = open_model(folder).manifest.spec
    except (OSError, ValueError, KeyError):
        return False
    return tuple(spec.table_rows) == tuple(table_sizes)


def generated_data(config: ScaleConfig) -> Path:
    """`mlet data synth` with the run's table sizes; a folder of other data is replaced."""
    folder = config.work / "data"
    schema = read_json(folder / "schema.json") if (folder / "schema.json").is_file() else {}
    same = schema.get("rows") == config.train_rows
    if not same or tuple(schema.get("table_sizes", ())) != config.table_sizes:
        shutil.rmtree(folder, ignore_errors=True)
    return synth(folder, config.train_rows, config.table_sizes, config.seed)


def train_command(data: Path, run: Path, name: str, config: ScaleConfig) -> list[str]:
    embedding, dim, hidden = RUNS[name]
    return mlet_command(
        "train", "--data", str(data), "--out", str(run), "--embedding", embedding,
        "--dim", str(dim), *(("--hidden", str(hidden)) if hidden else ()),
        "--epochs", "1", "--batch-size", str(config.batch_size), "--seed", str(config.seed),
        "--overwrite",
    )  # fmt: skip


def build_run(name: str, config: ScaleConfig, repo: Path, data: Path) -> dict:
    """Train one run briefly and export its chosen models; the checkpoint is then deleted.

    Every model keeps its tables in model.onnx.data at any size, so that the engines map
    them and smaps sees them (inside model.onnx they would be copied to the heap)."""
    models = [v for v in config.variants if MODELS[v][0] == name]
    if all(model_is_built(repo / m, config.table_sizes) for m in models):
        print(f"{name}: reusing {', '.join(models)} in {repo}", flush=True)
        return {"reused": True, "models": models}
    run = config.work / "runs" / name
    print(f"{name}: training one pass on {data} ...", flush=True)
    trained = measure_child(train_command(data, run, name, config))
    metrics = read_json(run / "metrics.json")
    variants = ",".join(MODELS[m][1] for m in models)
    print(f"{name}: exporting {variants} ...", flush=True)
    export = measure_child(
        mlet_command("export", str(run), "--repo", str(repo), "--name", name, "--variants",
                     variants, "--replace", "--external-data-bytes", "0")
    )  # fmt: skip
    if not config.keep_runs:
        shutil.rmtree(run)
    return {
        "reused": False,
        "models": models,
        "weights": f"mlet train (TorchRec), one pass of {config.train_rows:,} generated rows",
        "train_seconds": trained["seconds"],
        "train_peak_rss_bytes": trained["peak_rss_bytes"],
        "steps": metrics.get("steps"),
        "test_auc": metrics.get("test", {}).get("auc"),
        "export_seconds": export["seconds"],
        "export_peak_rss_bytes": export["peak_rss_bytes"],
    }


# -- measuring a server -----------------------------------------------------------------------


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_from_page_cache(folder: Path) -> None:
    """Evict the model's clean pages, so that the next read comes from disk."""
    for path in model_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(folder: Path, chunk: int = 8 << 20) -> float:
    """Seconds to read the model's files once, from disk (the page cache dropped first)."""
    drop_from_page_cache(folder)
    started = time.perf_counter()
    for path in model_files(folder):
        with open(path, "rb", buffering=0) as f:
            while f.read(chunk):
                pass
    return time.perf_counter() - started


def resident_bytes_of_files(tree: ProcessTree, folder: Path) -> int:
    """Resident bytes of the pages of `folder`'s files mapped by the server's processes,
    from /proc/PID/smaps (a file mapped by two processes counts in each)."""
    inodes = {(stat.st_dev, stat.st_ino) for stat in map(os.stat, model_files(folder))}
    total = 0
    for process in tree.processes():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            total += smaps_resident(process.pid, inodes)
    return total


def smaps_resident(pid: int, inodes: set[tuple[int, int]]) -> int:
    total, counting = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                counting = (os.makedev(major, minor), int(fields[4])) in inodes
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


class PeakRss:
    """Samples a process tree's RSS on a thread while the block runs; `.peak` after."""

    def __init__(self, tree: ProcessTree, interval: float = 0.05) -> None:
        self.tree, self.interval, self.peak = tree, interval, 0
        self.stop = threading.Event()

    def sample(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.tree.memory_info().rss)
            self.stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.tree.memory_info().rss)


def touch_every_row(url: str, model: str, spec, rows_per_request: int) -> float:
    """Uniform warm-up: row r of the warm-up holds id r mod N of every table of N rows, so
    that the largest table's row count of rows touches every row of every table."""
    largest = max(spec.table_rows)
    sizes = np.asarray(spec.table_rows, dtype=np.int64)
    sparse_spec = spec.sparse_input
    started = time.perf_counter()
    for start in tqdm(
        range(0, largest, rows_per_request),
        desc=f"warm-up {model}",
        unit="req",
        leave=False,
        mininterval=5,
    ):
        ids = np.arange(start, min(largest, start + rows_per_request), dtype=np.int64)
        sparse = ids[:, None] % sizes[None, :]
        if len(sparse_spec.shape) == 3:
            sparse = np.repeat(sparse[:, :, None], sparse_spec.shape[2], axis=2)
        dense = np.zeros((len(ids), spec.num_dense), dtype=np.float32)
        inputs = spec.model_inputs(dense, sparse.astype(sparse_spec.dtype))
        http_infer(
            url, model, *encode_inputs(spec, inputs, binary=True), WARM_UP_TIMEOUT_S, "warm-up"
        )
    return time.perf_counter() - started


@dataclass
class Loads:
    """Request bodies for every (ids, rows per request), drawn once and sent to every model."""

    config: ScaleConfig
    exponent: float
    samplers: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def bodies(self, spec, ids: str, rows: int) -> list[tuple[bytes, dict]]:
        if ids not in self.samplers:
            self.samplers[ids], self.notes[ids] = id_samplers(
                ids, tuple(spec.table_rows), self.config.seed, self.exponent,
                self.config.ids_from,
            )  # fmt: skip
        factory = RequestFactory(spec, seed=self.config.seed + rows, samplers=self.samplers[ids])
        return [factory.body(rows, binary=True) for _ in range(self.config.pool)]


def serve_and_load(engine: str, repo: Path, model: str, config: ScaleConfig, loads: Loads):
    """One engine serving one model: its rows of scale.json and the details beside them."""
    folder = repo / model
    manifest = open_model(folder).manifest
    spec, disk = manifest.spec, manifest.model_bytes
    read_s = read_seconds(folder)
    drop_from_page_cache(folder)
    started = time.perf_counter()
    server = Engine(name=engine, tritonserver=config.tritonserver)
    rows, details = [], {"engine": engine, "variant": model, "read_s": read_s, "loads": []}
    with running_engine(server, repo, [model], timeout=1800.0) as (url, tree):
        ready_s = time.perf_counter() - started
        http_infer(
            url, model, *RequestFactory(spec, seed=1).body(1, True), WARM_UP_TIMEOUT_S, "first"
        )
        details["first_answer_s"] = time.perf_counter() - started
        details["warmup_s"] = touch_every_row(url, model, spec, config.warmup_rows)
        rss = tree.memory_info().rss
        resident = resident_bytes_of_files(tree, folder)
        print(
            f"{engine} {model}: ready {ready_s:.1f} s (read {read_s:.1f} s), RSS {gib(rss)}, "
            f"model resident {gib(resident)}",
            flush=True,
        )
        for ids in config.ids:
            for count in config.rows_per_request:
                bodies = loads.bodies(spec, ids, count)
                for body, headers in bodies[:4]:
                    http_infer(url, model, body, headers, WARM_UP_TIMEOUT_S, "warm-up")
                server_cpu, client_cpu = sum(tree.cpu_times()), children_cpu_seconds()
                path = f"/v2/models/{model}/infer"
                with PeakRss(tree) as peak:
                    stats = run_wrk(url, path, bodies, config.connections, config.seconds)
                row = {
                    "engine": engine,
                    "variant": model,
                    "ids": ids,
                    "rows_per_request": count,
                    "disk_bytes": disk,
                    "ready_s": ready_s,
                    "rss_bytes": rss,
                    "peak_rss_bytes": peak.peak,
                    "model_resident_bytes": resident,
                    "requests_per_s": stats["requests_per_s"],
                    "rows_per_s": stats["requests_per_s"] * count,
                    "p50_ms": stats["p50_ms"],
                    "p99_ms": stats["p99_ms"],
                    "p999_ms": stats["p999_ms"],
                }
                rows.append(row)
                details["loads"].append(
                    {
                        "ids": ids,
                        "rows_per_request": count,
                        "requests": stats["requests"],
                        "failures": stats["failures"],
                        "max_ms": stats["max_ms"],
                        "server_cpu_s": sum(tree.cpu_times()) - server_cpu,
                        "client_cpu_s": children_cpu_seconds() - client_cpu,
                        "model_resident_bytes_after": resident_bytes_of_files(tree, folder),
                    }
                )
                print(
                    f"  {ids}, {count}-row: {row['rows_per_s']:,.0f} rows/s, "
                    f"p99 {row['p99_ms']:.2f} ms, failures {stats['failures']}",
                    flush=True,
                )
    return rows, details


# -- the benchmark ----------------------------------------------------------------------------


def zipf_exponent(config: ScaleConfig) -> tuple[float, dict]:
    if config.zipf_exponent is not None:
        return config.zipf_exponent, {"source": "given"}
    if config.zipf_from is not None:
        fit = fit_zipf_on_dataset(config.zipf_from)
        return fit.exponent, {"source": "fitted", **asdict(fit)}
    return ZIPF_EXPONENT, {"source": "default (no --zipf-from log to fit on)"}


def run_scale(config: ScaleConfig, out: str | Path) -> list[dict]:
    """Build, serve and load every chosen model on every chosen engine; write the reports."""
    out = Path(out)
    missing = wrk_missing_reason()
    if missing:
        raise RuntimeError(f"mlet bench scale drives its loads with wrk: {missing}")
    need = needs(config)
    work = existing_parent(config.work)
    check_resources(need, psutil.virtual_memory().available, shutil.disk_usage(work).free, work)
    print(
        f"needs about {gib(need['memory_bytes'])} of memory ({need['memory_step']}) and "
        f"{gib(need['disk_bytes'])} of disk in {config.work}",
        flush=True,
    )
    exponent, zipf = zipf_exponent(config)
    repo = config.work / "models"
    started = time.perf_counter()
    data = generated_data(config)
    builds = {run: build_run(run, config, repo, data) for run in config.runs()}
    loads = Loads(config, exponent)
    rows, served = [], []
    for model in config.variants:  # one model in memory at a time: each engine in turn
        for engine in config.engines:
            model_rows, details = serve_and_load(engine, repo, model, config, loads)
            rows += model_rows
            served.append(details)
    manifests = {m: open_model(repo / m).manifest for m in config.variants}
    details = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "environment": environment({"scale": str(config)}),
        "needs": need,
        "zipf": {"exponent": exponent, **zipf},
        "ids": loads.notes,
        "builds": builds,
        "served": served,
        "parity": {m: manifests[m].parity for m in config.variants},
        "accuracy": {m: manifests[m].accuracy for m in config.variants},
        "seconds": time.perf_counter() - started,
    }
    write_scale_results(out, rows, details)
    return rows


def write_scale_results(out: Path, rows: list[dict], details: dict) -> None:
    from bench.report.scale_report import scale_html, scale_markdown, scale_plots

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scale.json", [{key: row[key] for key in SCALE_KEYS} for row in rows])
    write_json(out / "scale-details.json", details)
    plots = scale_plots(rows)
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"scale-{name}.png").write_bytes(png)
    (out / "scale.md").write_text(scale_markdown(rows, details, plots))
    (out / "scale.html").write_text(scale_html(rows, details, plots))
