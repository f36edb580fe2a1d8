"""Latency-throughput curves: step the number of Locust users until the server saturates.

For each model a server process of its own runs every step of every request kind; each
step records both sides' CPU, so a curve can say whether the server or the load
generator ran out first, and the server's own queue and compute times beside the
client's latency. Repetitions are interleaved across models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.load.load_test import LoadConfig, load_step, served_for_load, warm_up_folder
from bench.load.request_bodies import require_raw_models, served_name
from bench.load.servers import Engine
from bench.stats import median_and_spread, unmeasured_as_null
from mlet.files import write_json
from mlet.repository import open_model

STEP_FIGURES = (
    "requests_per_s", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "client_cpu_cores",
    "server_cpu_cores", "server_queue_ms", "server_compute_ms", "server_batch_rows",
)  # fmt: skip


@dataclass(frozen=True)
class RequestKind:
    name: str
    rows: int
    binary: bool
    users: tuple[int, ...]


SMALL_USERS, LARGE_USERS = (1, 4, 16, 64, 128), (1, 2, 4, 8, 16, 32)
DEFAULT_KINDS = (
    RequestKind("1-row JSON", rows=1, binary=False, users=SMALL_USERS),
    RequestKind("256-row binary", rows=256, binary=True, users=LARGE_USERS),
)


def request_kinds(protocol: str = "http", raw: bool = False) -> tuple[RequestKind, ...]:
    """The default kinds of a sweep over `protocol`: ids, or (raw) logged columns, whose
    large requests are 64 rows (a client's page of impressions, say)."""
    if protocol == "http" and not raw:
        return DEFAULT_KINDS
    small, large = ("JSON", "binary") if protocol == "http" else ("gRPC", "gRPC")
    what, rows = ("raw ", 64) if raw else ("", 256)
    return (
        RequestKind(f"1-row {what}{small}", rows=1, binary=False, users=SMALL_USERS),
        RequestKind(f"{rows}-row {what}{large}", rows=rows, binary=True, users=LARGE_USERS),
    )


@dataclass
class SweepConfig:
    kinds: tuple[RequestKind, ...] = DEFAULT_KINDS
    duration: float = 8.0
    repetitions: int = 3
    saturation_gain: float = 0.05  # a step that adds less throughput than this has saturated
    locust_processes: int = 1
    server_args: tuple[str, ...] = ()
    engine: Engine = field(default_factory=Engine)
    reference_users: int = 16  # the 1-row step whose p99 the headline compares
    protocol: str = "http"  # http | grpc (Locust's gRPC user)
    raw: bool = False  # logged columns to NAME-raw instead of ids to NAME


def saturated(previous: dict | None, current: dict, gain: float) -> bool:
    """True when more users bought less than `gain` more throughput, or failures began."""
    if current["failures"] > 0:
        return True
    if previous is None:
        return False
    return current["rows_per_s"] < previous["rows_per_s"] * (1 + gain)


def sweep_once(
    repo: Path, model: str, config: SweepConfig, out: Path, planned: dict | None = None
) -> dict:
    """Every step of every request kind against one server process: until saturation, or
    through the users `planned` per kind (those a first pass stepped through)."""
    curves = {}
    called = served_name(repo / model, config.raw)
    served = LoadConfig(engine=config.engine, server_args=config.server_args,
                        protocol=config.protocol, raw=config.raw)  # fmt: skip
    with served_for_load(repo, model, served) as (url, server, target):
        rss_loaded = server.memory_info().rss
        for kind in config.kinds:
            steps, previous = [], None
            warm_up_folder(target, repo / model, replace(served, rows=kind.rows,
                                                         binary=kind.binary))  # fmt: skip
            for users in kind.users if planned is None else planned[kind.name]:
                load = replace(
                    served, users=users, duration=config.duration, rows=kind.rows,
                    binary=kind.binary, locust_processes=config.locust_processes,
                )  # fmt: skip
                prefix = out / f"{called}-{kind.rows}rows-{users}users"
                step = load_step(url, server, called, repo / model, load, prefix, target)
                steps.append(step)
                if planned is None and saturated(previous, step, config.saturation_gain):
                    break
                previous = step
            curves[kind.name] = steps
        rss_after = server.memory_info().rss
    return {"curves": curves, "server_rss_loaded_bytes": rss_loaded, "server_rss_bytes": rss_after}


def run_sweep(
    repo: str | Path, models: list[str], config: SweepConfig, out: str | Path
) -> list[dict]:
    repo, out = Path(repo), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in models}
    for repetition in range(config.repetitions):
        for model in models:
            folder = out / f"rep{repetition}"
            folder.mkdir(exist_ok=True)
            # a model's first pass finds where its server saturates; its later passes step
            # through the same users, so the repetitions line up step by step
            planned = stepped_users(runs[model][0]) if runs[model] else None
            runs[model].append(sweep_once(repo, model, config, folder, planned))
            print(f"sweep {model} #{repetition + 1} done", flush=True)
    return [summarise(repo, m, runs[m], config) for m in models]


def run_sweep_command(repo: str | Path, models: list[str], config: SweepConfig, out: Path) -> Path:
    """`mlet bench load --sweep`: Locust's files under out/locust, the summaries in sweep.json."""
    if config.raw:
        require_raw_models(Path(repo), models)
    path = out / "sweep.json"
    write_json(path, unmeasured_as_null(run_sweep(repo, models, config, out / "locust")))
    return path


def stepped_users(run: dict) -> dict[str, list[int]]:
    """The users each request kind of a sweep pass stepped through."""
    return {kind: [step["users"] for step in steps] for kind, steps in run["curves"].items()}


def summarise(repo: Path, model: str, runs: list[dict], config: SweepConfig) -> dict:
    manifest = open_model(repo / model).manifest
    curves = {}
    for kind in config.kinds:
        steps = []
        for i, users in enumerate(stepped_users(runs[0])[kind.name]):
            step = {"users": users}
            for figure in STEP_FIGURES:
                step[figure] = median_and_spread([r["curves"][kind.name][i][figure] for r in runs])
            step["failures"] = sum(r["curves"][kind.name][i]["failures"] for r in runs)
            steps.append(step)
        curves[kind.name] = steps
    return {
        "model": model,
        "called": served_name(repo / model, config.raw),
        "protocol": config.protocol,
        "engine": config.engine.describe(),
        "model_bytes": manifest.model_bytes,
        "embedding_bytes": manifest.embedding_bytes,
        "test_auc": manifest.test_auc,
        "variant": manifest.variant,
        "server_rss_loaded_bytes": median_and_spread([r["server_rss_loaded_bytes"] for r in runs]),
        "server_rss_bytes": median_and_spread([r["server_rss_bytes"] for r in runs]),
        "curves": curves,
        "kinds": [asdict(k) for k in config.kinds],
    }
