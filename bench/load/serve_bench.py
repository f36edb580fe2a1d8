"""`mlet bench serve`: the serving comparisons, side by side in one run on one machine.

1. 1-row requests (JSON, or gRPC) from many users: dynamic batching on against off.
2. N-row requests (binary tensors and JSON, or gRPC's raw contents): the server's rows/s
   against ONNX Runtime's rows/s in-process at the same batch size.
Each configuration runs `repetitions` times, interleaved, and the median is reported with
its spread, so slow drift of the machine hits every configuration alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.inprocess.timing import onnxruntime_model, time_batch
from bench.load.load_test import LoadConfig, load_test_model
from bench.load.request_bodies import RequestFactory
from bench.load.servers import Engine
from bench.stats import median_and_spread, unmeasured_as_null
from mlet.files import write_json
from mlet.markdown import markdown_table
from mlet.runtime import SessionOptions


@dataclass
class ServeBenchConfig:
    small_users: int = 64
    large_rows: int = 256
    large_users: int = 32  # enough to keep the server busy: its capacity, not the client's
    duration: float = 15.0
    repetitions: int = 3
    # Another engine's batching comes from config.pbtxt: only "on" is measured there.
    engine: Engine = field(default_factory=Engine)
    protocol: str = "http"  # http | grpc (Locust's gRPC user; no JSON there)

    @property
    def small_kind(self) -> str:
        return "JSON" if self.protocol == "http" else "gRPC"


def run_serve_bench(
    repo: str | Path, model: str, config: ServeBenchConfig, out: str | Path
) -> dict:
    repo, out = Path(repo), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours, engine, protocol = config.engine.name == "mlet", config.engine, config.protocol
    scenarios = {
        "small_batching_on": LoadConfig(
            users=config.small_users, duration=config.duration, engine=engine,
            server_args=("--batching", "on") if ours else (), protocol=protocol,
        ),
        "small_batching_off": LoadConfig(
            users=config.small_users, duration=config.duration, engine=engine,
            server_args=("--batching", "off"), protocol=protocol,
        ),
        "large_binary": LoadConfig(
            users=config.large_users, duration=config.duration, rows=config.large_rows,
            binary=True, engine=engine, protocol=protocol,
        ),
        "large_json": LoadConfig(
            users=config.large_users, duration=config.duration, rows=config.large_rows,
            engine=engine,
        ),
    }  # fmt: skip
    if not ours:
        del scenarios["small_batching_off"]
    if protocol == "grpc":
        del scenarios["large_json"]  # gRPC has one way to send tensors
    runs: dict[str, list[dict]] = {name: [] for name in scenarios}
    inprocess = []
    for repetition in range(config.repetitions):
        for name, load in scenarios.items():
            folder = out / f"{name}-{repetition}"
            folder.mkdir(exist_ok=True)
            runs[name].append(load_test_model(repo, model, load, folder))
            print(f"{name} #{repetition + 1}: {runs[name][-1]['requests_per_s']:.0f} requests/s")
        # the server's session options: the ceiling is the same session, without HTTP
        runner, spec = onnxruntime_model(repo / model, SessionOptions())
        factory = RequestFactory(spec)
        inprocess.append(asdict(time_batch(runner, factory, config.large_rows, 200)))
    summary = summarise(runs, inprocess)
    report = {"model": model, "config": asdict(config), "summary": summary, "runs": runs,
              "inprocess": inprocess}  # fmt: skip
    write_json(out / "serve.json", unmeasured_as_null(report))
    (out / "serve.md").write_text(serve_markdown(model, config, summary))
    return report


def summarise(runs: dict[str, list[dict]], inprocess: list[dict]) -> dict:
    def figure(name: str, key: str) -> dict:
        if name not in runs:  # batching off is measured on our server only
            return {"median": float("nan"), "spread": float("nan"), "noisy": False}
        return median_and_spread([r[key] for r in runs[name]])

    on_rps, off_rps = (
        figure("small_batching_on", "requests_per_s"),
        figure("small_batching_off", "requests_per_s"),
    )
    on_p99, off_p99 = figure("small_batching_on", "p99_ms"), figure("small_batching_off", "p99_ms")
    binary, json_rows = figure("large_binary", "rows_per_s"), figure("large_json", "rows_per_s")
    direct = median_and_spread([r["rows_per_s"] for r in inprocess])
    failures = sum(r["failures"] for rs in runs.values() for r in rs)
    return {
        "batching_on_requests_per_s": on_rps,
        "batching_off_requests_per_s": off_rps,
        "batching_on_p99_ms": on_p99,
        "batching_off_p99_ms": off_p99,
        "batching_speedup": on_rps["median"] / off_rps["median"],
        "p99_ratio_on_over_off": on_p99["median"] / off_p99["median"],
        "server_binary_rows_per_s": binary,
        "server_json_rows_per_s": json_rows,
        "inprocess_rows_per_s": direct,
        "binary_fraction_of_inprocess": binary["median"] / direct["median"],
        "json_fraction_of_inprocess": json_rows["median"] / direct["median"],
        "failures": failures,
    }


def cell(figure: dict, digits: int = 0) -> str:
    """A median with its spread, flagged when the spread passes 10%."""
    flag = " (noisy)" if figure["noisy"] else ""
    return f"{figure['median']:,.{digits}f} ±{figure['spread']:.0%}{flag}"


def serve_markdown(model: str, config: ServeBenchConfig, s: dict) -> str:
    batching = markdown_table(
        ["batching", "requests/s", "p99 ms"],
        [
            ["on", cell(s["batching_on_requests_per_s"]), cell(s["batching_on_p99_ms"], 1)],
            ["off", cell(s["batching_off_requests_per_s"]), cell(s["batching_off_p99_ms"], 1)],
        ],
        "lrr",
    )
    paths = markdown_table(
        ["path", "rows/s", "fraction of in-process"],
        [
            [f"ONNX Runtime in-process, batch {config.large_rows}",
             cell(s["inprocess_rows_per_s"]), "1.00"],
            ["server, binary tensors" if config.protocol == "http" else "server, gRPC",
             cell(s["server_binary_rows_per_s"]), f"{s['binary_fraction_of_inprocess']:.2f}"],
            *([["server, JSON", cell(s["server_json_rows_per_s"]),
                f"{s['json_fraction_of_inprocess']:.2f}"]] if config.protocol == "http" else []),
        ],
        "lrr",
    )  # fmt: skip
    return "\n".join(
        [
            f"# Serving benchmark: {model}",
            "",
            f"Engine: {config.engine.describe()}.",
            "",
            f"Median of {config.repetitions} interleaved repetitions of {config.duration:g} s "
            "(± is the spread, max - min over median). Load generator on the same machine.",
            "",
            f"## 1-row {config.small_kind} requests, {config.small_users} users",
            "",
            batching,
            "",
            f"Batching on / off: {s['batching_speedup']:.2f}x requests/s, p99 "
            f"{s['p99_ratio_on_over_off']:.2f}x.",
            "",
            f"## {config.large_rows}-row requests, {config.large_users} users",
            "",
            paths,
            "",
            f"Failed requests over all runs: {s['failures']}.",
            "",
        ]
    )
