"""Load tests: start the server, run Locust headless against each model, summarise.

Each model is served by a server process of its own, so that the resident memory
measured belongs to that model alone. Traffic goes to 127.0.0.1 only, for a bounded
duration.
"""

from __future__ import annotations

import contextlib
import csv
import os
import resource
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.load.locust_support import LocustSettings
from bench.load.request_bodies import (
    RequestFactory,
    request_factory,
    require_raw_models,
    served_models,
    served_name,
)
from bench.load.servers import Engine, running_engine
from bench.stats import unmeasured_as_null
from mlet.files import write_json
from mlet.infer_request import grpc_infer, grpc_request, grpc_stub, http_body, http_infer
from mlet.markdown import markdown_table
from mlet.repository import open_model, require_models
from mlet.spec import ExportSpec
from serve.process import free_port

LOCUSTFILES = {
    "http": Path(__file__).with_name("locustfile.py"),
    "grpc": Path(__file__).with_name("locustfile_grpc.py"),
}
PROTOCOLS = tuple(LOCUSTFILES)
WARM_UP_REQUESTS = 5
WARM_UP_TIMEOUT_S = 60.0


@dataclass
class LoadConfig:
    users: int = 16
    spawn_rate: float | None = None  # users started per second; default: all at once
    duration: float = 10.0
    rows: int = 1
    binary: bool = False
    zipf_exponent: float = 1.05
    locust_processes: int = 1  # more when the load generator itself saturates
    server_args: tuple[str, ...] = ()  # extra `mlet serve` options, e.g. ("--batching", "off")
    ready_timeout: float = 60.0
    engine: Engine = field(default_factory=Engine)  # which server the load goes to
    protocol: str = "http"  # http, or grpc (Locust's gRPC user, raw_input_contents)
    raw: bool = False  # logged columns to NAME-raw instead of ids to NAME

    def __post_init__(self) -> None:
        if self.users < 1 or self.rows < 1:
            raise ValueError("users and rows must be positive")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.duration < 2:
            # Locust writes its final statistics on a one-second cadence; shorter runs
            # can end before any is written.
            raise ValueError(f"duration must be at least 2 seconds, got {self.duration:g}")


def run_locust(url: str, model: str, folder: Path, config: LoadConfig, prefix: Path) -> None:
    """Locust headless against `url` (gRPC: host:port): `model` is the model called, `folder`
    the model folder its requests are drawn for (for NAME-raw: NAME's)."""
    settings = LocustSettings(
        model, folder, config.rows, config.binary, config.raw, config.zipf_exponent
    )
    env = {**os.environ, **settings.env()}
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILES[config.protocol]), "--headless",
        "--host", url, "-u", str(config.users), "-r", str(config.spawn_rate or config.users),
        "-t", f"{config.duration:g}s", "--csv", str(prefix), "--only-summary",
        "--loglevel", "WARNING", "--stop-timeout", "5",
    ]  # fmt: skip
    if config.locust_processes > 1:
        command += ["--processes", str(config.locust_processes)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if not Path(f"{prefix}_stats.csv").is_file():
        raise RuntimeError(
            f"locust wrote no statistics (exit {result.returncode}):\n{result.stderr[-2000:]}"
        )


def read_locust_stats(prefix: Path) -> dict:
    """The aggregated row of Locust's stats CSV: counts, throughput, latency percentiles (ms)."""
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    if int(total["Request Count"]) == 0:
        raise RuntimeError(f"no request completed in the load run ({prefix}_stats.csv)")
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "requests_per_s": float(total["Requests/s"]),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
        "mean_ms": float(total["Average Response Time"]),
        "max_ms": float(total["Max Response Time"]),
    }


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scrape_server_metrics(url: str, model: str) -> dict[str, float]:
    """Sums and counts of the server's queue, compute and batch-rows histograms for a model
    (none from a server without our metrics, such as Triton)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    wanted = {"mlet_queue_duration_seconds", "mlet_compute_duration_seconds", "mlet_batch_rows"}
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.name.endswith(("_sum", "_count")):
                values[sample.name] = sample.value
    return values


def server_side_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean queue and compute time per request/batch, and mean batch rows, over a step."""

    def mean(name: str, scale: float = 1.0) -> float:
        count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
        return total / count * scale if count else 0.0

    return {
        "server_queue_ms": mean("mlet_queue_duration_seconds", 1000),
        "server_compute_ms": mean("mlet_compute_duration_seconds", 1000),
        "server_batch_rows": mean("mlet_batch_rows"),
    }


def load_step(
    url: str,
    server: psutil.Process,
    model: str,
    folder: Path,
    config: LoadConfig,
    prefix: Path,
    target: str | None = None,
) -> dict:
    """One Locust run against a running server, with both sides' CPU and the server's view.

    `model` is the model called (NAME-raw for raw loads), `folder` the model folder its
    requests are drawn for; `target` is where Locust sends (default `url`; gRPC: host:port),
    while the server's metrics are read from `url`."""
    metrics_before = scrape_server_metrics(url, model)
    server_cpu, client_cpu = sum(server.cpu_times()[:2]), children_cpu_seconds()
    started = time.monotonic()
    run_locust(target or url, model, folder, config, prefix)
    elapsed = time.monotonic() - started
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu
    client_cpu = children_cpu_seconds() - client_cpu
    stats = read_locust_stats(prefix)
    return {
        **stats,
        "users": config.users,
        "rows_per_request": config.rows,
        "rows_per_s": stats["requests_per_s"] * config.rows,
        # CPU cores each side kept busy on average; near the core count means saturated
        "client_cpu_cores": client_cpu / elapsed,
        "server_cpu_cores": server_cpu / elapsed,
        **server_side_means(metrics_before, scrape_server_metrics(url, model)),
        "server_rss_bytes": server.memory_info().rss,
    }


def warm_up(url: str, model: str, spec: ExportSpec, config: LoadConfig) -> None:
    """A few requests like the load's before it is timed.

    The first inferences pay one-time costs (allocations, lazy initialisation) that are
    not the steady state a load test measures, and a server that cannot answer fails here
    with its reply instead of as a load run with no completed request.
    """
    # another seed than the locustfile's, so that no timed request repeats a warm-up one
    send_warm_up(url, model, RequestFactory(spec, config.zipf_exponent, seed=1), config)


def warm_up_folder(target: str, folder: Path, config: LoadConfig) -> None:
    """`warm_up` for any load: over config.protocol, ids to the folder's model or (raw)
    logged columns to its NAME-raw."""
    factory = request_factory(folder, config.raw, config.zipf_exponent, seed=1)
    send_warm_up(target, served_name(folder, config.raw), factory, config)


def send_warm_up(target: str, model: str, factory, config: LoadConfig) -> None:
    if config.protocol == "grpc":
        with grpc_stub(target) as stub:
            for _ in range(WARM_UP_REQUESTS):
                request = grpc_request(model, factory.tensors(config.rows))
                grpc_infer(stub, request, WARM_UP_TIMEOUT_S)
        return
    for _ in range(WARM_UP_REQUESTS):
        tensors = factory.tensors(config.rows)
        body = http_body(tensors, config.binary, binary_output=config.binary)
        http_infer(target, model, *body, WARM_UP_TIMEOUT_S, "warm-up")


@contextlib.contextmanager
def served_for_load(repo: Path, model: str, config: LoadConfig):
    """config.engine serving what a load on `model` calls (with config.raw its NAME-raw and
    steps; over gRPC with a gRPC port): yields (url, server process, where the load goes)."""
    engine = config.engine
    grpc_port = free_port() if config.protocol == "grpc" and engine.url is None else None
    with running_engine(
        engine, repo, served_models(model, config.raw), *config.server_args,
        timeout=config.ready_timeout, grpc_port=grpc_port,
    ) as (url, server):  # fmt: skip
        yield url, server, engine.grpc_address(grpc_port) if config.protocol == "grpc" else url


def load_test_model(repo: Path, model: str, config: LoadConfig, out: Path) -> dict:
    """One model's load: `model`, or with config.raw its NAME-raw, over config.protocol."""
    manifest = open_model(repo / model).manifest
    called = served_name(repo / model, config.raw)
    with served_for_load(repo, model, config) as (url, server, target):
        rss_loaded = server.memory_info().rss
        warm_up_folder(target, repo / model, config)
        prefix = out / f"locust-{called}"
        step = load_step(url, server, called, repo / model, config, prefix, target)
    return {
        "model": called,
        "engine": config.engine.describe(),
        **step,
        "model_bytes": manifest.model_bytes,
        "embedding_bytes": manifest.embedding_bytes,
        "server_rss_loaded_bytes": rss_loaded,
    }


def run_load(
    repo: str | Path, models: list[str], config: LoadConfig, out: str | Path
) -> list[dict]:
    """Load-test each model in turn and write summary.json and summary.md into `out`."""
    repo, out = Path(repo), Path(out)
    require_models(repo, models)
    if config.raw:
        require_raw_models(repo, models)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [load_test_model(repo, m, config, out) for m in models]
    summary = {"config": asdict(config), "models": summaries}
    write_json(out / "summary.json", unmeasured_as_null(summary))
    (out / "summary.md").write_text(summary_markdown(summaries, config))
    return summaries


def load_encoding(config: LoadConfig) -> str:
    """How a load's requests travel, for its summary line."""
    what = "raw logged columns" if config.raw else "tensors"
    if config.protocol == "grpc":
        return f"gRPC ({what} in raw_input_contents)"
    return f"{'binary' if config.binary else 'JSON'} {what}"


def summary_markdown(summaries: list[dict], config: LoadConfig) -> str:
    lines = [
        f"Engine: {config.engine.describe()}. "
        f"Load: {config.users} users, {config.rows} row(s) per request, "
        f"{load_encoding(config)}, {config.duration:g} s per model.",
        "",
    ]
    header = ["model", "requests/s", "p50 ms", "p95 ms", "p99 ms", "failures", "model bytes",
              "server RSS MiB"]  # fmt: skip
    rows = [
        [s["model"], f"{s['requests_per_s']:.1f}", f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}",
         f"{s['p99_ms']:.1f}", str(s["failures"]), f"{s['model_bytes']:,}",
         f"{s['server_rss_bytes'] / 2**20:.1f}"]
        for s in summaries
    ]  # fmt: skip
    return "\n".join(lines) + "\n" + markdown_table(header, rows, "lrrrrrrr") + "\n"
