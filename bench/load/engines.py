"""`mlet bench engines`: our server and Triton, the same model under the same load.

The engines themselves (ours, real Triton, a server at a URL) are bench/load/servers.py's.
`mlet bench engines` serves one model with each
engine in turn and drives both with the same request bodies, the same connections and the
same duration: 1-row JSON requests, then 256-row binary ones. The load generator is wrk
(compiled, event-driven; `make test` installs Debian's package) or, where wrk is missing,
several Locust processes. Its CPU is reported beside the server's, so that a reader sees
whether the generator or the server was the limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.environment import environment
from bench.load.load_test import (
    LoadConfig,
    children_cpu_seconds,
    read_locust_stats,
    run_locust,
    warm_up,
)
from bench.load.request_bodies import RequestFactory
from bench.load.servers import ENGINES, Engine, ProcessTree, running_engine
from mlet.files import write_json
from mlet.repository import open_model

# -- load generators ----------------------------------------------------------------------

WRK_SCRIPT = """
local requests, n = {}, 0
init = function(args)
  for i, headers in ipairs(HEADERS) do
    local f = assert(io.open(DIR .. "/body-" .. i, "rb"))
    requests[i] = wrk.format("POST", PATH, headers, f:read("*a"))
    f:close()
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
done = function(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d, '
    .. '"p999_us": %d, "mean_us": %.1f, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean,
    latency.max))
end
"""


def wrk_missing_reason() -> str | None:
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian: apt-get install wrk; `make test` does it as root)"
    return None


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII text is a valid Lua string literal


def write_wrk_script(folder: Path, path: str, bodies: list[tuple[bytes, dict]]) -> Path:
    headers = []
    for i, (body, head) in enumerate(bodies, start=1):
        (folder / f"body-{i}").write_bytes(body)
        pairs = ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in head.items())
        headers.append(f"{{{pairs}}}")
    script = folder / "load.lua"
    script.write_text(
        f"DIR = {lua_string(str(folder))}\nPATH = {lua_string(path)}\n"
        f"HEADERS = {{{', '.join(headers)}}}\n{WRK_SCRIPT}"
    )
    return script


def run_wrk(url: str, path: str, bodies: list, connections: int, duration: float) -> dict:
    """wrk against url+path, cycling through the bodies; figures from its Lua summary."""
    with tempfile.TemporaryDirectory(prefix="mlet-wrk-") as folder:
        script = write_wrk_script(Path(folder), path, bodies)
        command = ["wrk", "-t", str(min(2, connections)), "-c", str(connections)]
        command += ["-d", f"{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script), url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    line = next((x for x in result.stdout.splitlines() if x.startswith("{")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {result.returncode}): {result.stderr[-1000:]}")
    figures = json.loads(line)
    seconds = figures["duration_us"] / 1e6
    return {
        "requests": figures["requests"],
        "failures": figures["errors"],
        "requests_per_s": figures["requests"] / seconds,
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "p999_ms": figures["p999_us"] / 1000,
        "mean_ms": figures["mean_us"] / 1000,
        "max_ms": figures["max_us"] / 1000,
    }


def run_locust_load(url, model, folder: Path, rows, binary, config, out: Path) -> dict:
    load = LoadConfig(
        users=config.connections,
        duration=config.duration,
        rows=rows,
        binary=binary,
        locust_processes=config.locust_processes,
    )
    prefix = out / f"locust-{model}-{rows}"
    run_locust(url, model, folder, load, prefix)
    return read_locust_stats(prefix)


# -- mlet bench engines -------------------------------------------------------------------


@dataclass
class EnginesConfig:
    engines: tuple[str, ...] = ENGINES
    duration: float = 20.0  # seconds per load
    connections: int = 32
    loads: tuple[tuple[int, bool], ...] = ((1, False), (256, True))  # (rows, binary)
    generator: str = "auto"  # wrk | locust | auto (wrk where installed)
    locust_processes: int = 2
    pool: int = 64  # distinct request bodies per load, the same for every engine
    tritonserver: str | None = None
    # Our server once more with batching off, on the 1-row load: what batching buys.
    batching_off: bool = True
    rounds: int = 4  # each load's duration is split into rounds that alternate the engines

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise ValueError(f"engines must be among {ENGINES}, got {list(self.engines)}")
        if self.generator not in ("auto", "wrk", "locust"):
            raise ValueError(f"generator must be auto, wrk or locust, got {self.generator!r}")
        if self.connections < 1 or self.rounds < 1 or self.duration / self.rounds < 1:
            raise ValueError("connections and rounds must be positive, each round >= 1 s")

    def chosen_generator(self) -> str:
        if self.generator == "auto":
            return "wrk" if wrk_missing_reason() is None else "locust"
        if self.generator == "wrk" and wrk_missing_reason() is not None:
            raise RuntimeError(wrk_missing_reason())
        return self.generator


def measure_load(url, server: ProcessTree, model, folder, rows, binary, bodies, config, out):
    """One load of `config.duration / config.rounds` seconds against a running engine,
    with both sides' CPU and the server's memory."""
    generator = config.chosen_generator()
    seconds = config.duration / config.rounds
    server_cpu, client_cpu = sum(server.cpu_times()), children_cpu_seconds()
    started = time.monotonic()
    if generator == "wrk":
        path = f"/v2/models/{model}/infer"
        stats = run_wrk(url, path, bodies, config.connections, seconds)
    else:
        load = dataclasses.replace(config, duration=seconds, rounds=1)
        stats = run_locust_load(url, model, folder, rows, binary, load, out)
    elapsed = time.monotonic() - started
    return {
        **stats,
        "elapsed_s": elapsed,
        "server_cpu_s": sum(server.cpu_times()) - server_cpu,
        "client_cpu_s": children_cpu_seconds() - client_cpu,
        "server_rss_bytes": server.memory_info().rss,
    }


def combine_rounds(
    label: str, rows: int, binary: bool, rounds: list[dict], rss: float, generator: str
) -> dict:
    """One engine's figures on one load from its interleaved rounds: totals over time for
    rates and CPU, the mean of the rounds' percentiles, every round kept."""
    elapsed = sum(r["elapsed_s"] for r in rounds)
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["requests"] / r["requests_per_s"] for r in rounds if r["requests_per_s"])
    requests_per_s = requests / seconds if seconds else 0.0
    return {
        "engine": label,
        "server_rss_loaded_bytes": rss,
        "requests": requests,
        "failures": sum(r["failures"] for r in rounds),
        "requests_per_s": requests_per_s,
        "rows_per_request": rows,
        "encoding": "binary" if binary else "JSON",
        "rows_per_s": requests_per_s * rows,
        **{key: statistics.mean(r[key] for r in rounds) for key in ("p50_ms", "p99_ms")},
        "max_ms": max(r["max_ms"] for r in rounds),
        "server_cpu_cores": sum(r["server_cpu_s"] for r in rounds) / elapsed,
        "client_cpu_cores": sum(r["client_cpu_s"] for r in rounds) / elapsed,
        "server_rss_bytes": max(r["server_rss_bytes"] for r in rounds),
        "generator": generator,
        "rounds": rounds,
    }


def run_engines(repo: str | Path, model: str, config: EnginesConfig, out: str | Path) -> dict:
    """Every engine serves the model at once, and each load drives one engine at a time, in
    rounds that alternate the engines, so that a machine whose speed drifts (shared cores)
    moves every side of a ratio alike. Writes engines.json and engines.md."""
    repo, out = Path(repo), Path(out)
    spec = open_model(repo / model).manifest.spec
    factory = RequestFactory(spec, seed=7)
    bodies = {
        load: [factory.body(*load) for _ in range(config.pool)] for load in config.loads
    }  # drawn once: every engine gets the very same requests
    out.mkdir(parents=True, exist_ok=True)
    generator_note = ""
    if config.chosen_generator() == "locust":
        missing = wrk_missing_reason()
        generator_note = f"{missing}: {config.locust_processes} Locust processes generate the load"
        print(generator_note if missing else "load generator: Locust (as asked)", flush=True)
    runs = [(name, name, (), config.loads) for name in config.engines]
    if config.batching_off and "mlet" in config.engines:
        small = tuple(load for load in config.loads if load[0] == 1)
        runs.append(("mlet", "mlet, batching off", ("--batching", "off"), small))
    largest = max(rows for rows, _ in config.loads)
    results, ceilings = [], []
    with contextlib.ExitStack() as stack:
        servers = start_engines(stack, runs, repo, model, config, out)
        for rows, binary in config.loads:
            labels = [label for _, label, _, loads in runs if (rows, binary) in loads]
            rounds = interleaved_rounds(
                servers, labels, repo / model, spec, (rows, binary), bodies, config, out,
                ceilings if rows == largest else None,
            )  # fmt: skip
            for label in labels:
                rss, generator = servers[label][2], config.chosen_generator()
                results.append(combine_rounds(label, rows, binary, rounds[label], rss, generator))
    ceiling = mean_ceiling(ceilings or [inprocess_ceiling(repo / model, largest)])
    summary = {
        "model": model,
        "config": asdict(config),
        "environment": environment({"engines": str(config)}),
        "generator_note": generator_note,
        "results": results,
        "inprocess": ceiling,
        "goals": goal_ratios(results, ceiling),
    }
    write_json(out / "engines.json", summary)
    (out / "engines.md").write_text(
        engines_markdown(model, config, results, generator_note, summary)
    )
    return summary


def start_engines(stack, runs, repo: Path, model: str, config: EnginesConfig, out: Path):
    """Start every engine of `runs`: label -> (url, process tree, resident bytes loaded)."""
    servers = {}
    for name, label, options, _ in runs:
        engine = Engine(name=name, tritonserver=config.tritonserver)
        log = out / f"{name}.log" if name == "triton" else None  # its backends, its loads
        url, server = stack.enter_context(
            running_engine(engine, repo, [model], *options, timeout=120.0, log=log)
        )
        servers[label] = (url, server, server.memory_info().rss)
    return servers


def interleaved_rounds(servers, labels, folder, spec, load, bodies, config, out, ceilings):
    """`config.rounds` rounds of one load, each engine in turn: label -> its rounds.

    With `ceilings` (a list), in-process ONNX Runtime is timed just before and just after
    each round of our server, so that the ceiling shares that load's machine."""
    rows, binary = load
    for label in labels:
        warm_up(servers[label][0], folder.name, spec, LoadConfig(rows=rows, binary=binary))
    rounds: dict[str, list[dict]] = {label: [] for label in labels}
    for number in range(1, config.rounds + 1):
        for label in labels:
            url, server, _ = servers[label]
            adjacent = ceilings is not None and label == "mlet"
            if adjacent:
                ceilings.append(inprocess_ceiling(folder, rows))
            figures = measure_load(
                url, server, folder.name, folder, rows, binary, bodies[load], config, out
            )
            if adjacent:
                ceilings.append(inprocess_ceiling(folder, rows))
            rounds[label].append({"round": number, **figures})
            rate = figures["requests_per_s"] * rows
            print(f"{label}, {rows}-row, round {number}: {rate:,.0f} rows/s", flush=True)
    return rounds


def inprocess_ceiling(model_folder: Path, rows: int) -> dict:
    """ONNX Runtime in this process at `rows` per call, with the server's session options:
    the same session as the server's, without HTTP, decoding or batching."""
    from bench.inprocess.timing import onnxruntime_model, time_batch
    from mlet.runtime import SessionOptions

    runner, spec = onnxruntime_model(model_folder, SessionOptions())
    return asdict(time_batch(runner, RequestFactory(spec), rows, min_iterations=200))


def mean_ceiling(timings: list[dict]) -> dict:
    """The mean of in-process timings at one batch size, each kept under "runs"."""
    mean = {key: sum(t[key] for t in timings) / len(timings) for key in ("p50_ms", "rows_per_s")}
    return {"batch": timings[0]["batch"], **mean, "runs": timings}


def goal_ratios(results: list[dict], ceiling: dict) -> dict:
    """Ours against Triton, batching on against off, and ours against in-process ONNX
    Runtime, from the results of one run (None where a side was not measured)."""

    def figure(engine: str, rows: int, key: str) -> float | None:
        found = [r[key] for r in results if r["engine"] == engine and r["rows_per_request"] == rows]
        return found[0] if found else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    largest = ceiling["batch"]
    return {
        "requests_ours_over_triton_1row": ratio(
            figure("mlet", 1, "requests_per_s"), figure("triton", 1, "requests_per_s")
        ),
        "p99_ours_over_triton_1row": ratio(
            figure("mlet", 1, "p99_ms"), figure("triton", 1, "p99_ms")
        ),
        "rows_ours_over_triton_batched": ratio(
            figure("mlet", largest, "rows_per_s"), figure("triton", largest, "rows_per_s")
        ),
        "rows_ours_over_inprocess_batched": ratio(
            figure("mlet", largest, "rows_per_s"), ceiling["rows_per_s"]
        ),
        "requests_batching_on_over_off_1row": ratio(
            figure("mlet", 1, "requests_per_s"), figure("mlet, batching off", 1, "requests_per_s")
        ),
        "p99_batching_on_over_off_1row": ratio(
            figure("mlet", 1, "p99_ms"), figure("mlet, batching off", 1, "p99_ms")
        ),
    }


GOAL_LINES = {
    "requests_ours_over_triton_1row": "1-row JSON requests/s, ours / Triton (goal >= 1)",
    "p99_ours_over_triton_1row": "1-row JSON p99, ours / Triton (goal <= 1)",
    "rows_ours_over_triton_batched": "batched rows/s, ours / Triton (goal >= 1)",
    "rows_ours_over_inprocess_batched": "batched rows/s, ours / in-process ONNX Runtime "
    "(goal >= 0.8)",
    "requests_batching_on_over_off_1row": "1-row requests/s, batching on / off (goal >= 2)",
    "p99_batching_on_over_off_1row": "1-row p99, batching on / off (goal <= 1)",
}


def engines_markdown(
    model: str, config: EnginesConfig, results: list[dict], note="", summary: dict | None = None
) -> str:
    generator = results[0]["generator"] if results else config.generator
    lines = [
        f"Engines on {model}: {config.connections} connections, {config.duration:g} s per load "
        f"per engine in {config.rounds} rounds that alternate the engines (all serving, one "
        f"loaded at a time), load generator {generator}, same request bodies. Rates are "
        f"totals over the rounds, latencies the mean of the rounds' percentiles.",
        "",
        "| engine | load | requests/s | rows/s | p50 ms | p99 ms | failures "
        "| server CPU cores | server RSS MiB | client CPU cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['rows_per_request']}-row {r['encoding']} "
            f"| {r['requests_per_s']:,.0f} | {r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['failures']} | {r['server_cpu_cores']:.2f} "
            f"| {r['server_rss_bytes'] / 2**20:.0f} | {r['client_cpu_cores']:.2f} |"
        )
    lines += [
        "",
        "Server CPU and memory cover the server process and its children (Triton's Python "
        "backend stubs); client CPU is the load generator's. Near the machine's core count "
        "together, the machine was the limit.",
        *([f"Note: {note}."] if note else []),
    ]
    if summary is not None:
        ceiling = summary["inprocess"]
        lines += [
            "",
            f"In-process ONNX Runtime, batch {ceiling['batch']}, the server's session options, "
            f"timed just before and just after each round of our batched load: "
            f"{ceiling['rows_per_s']:,.0f} rows/s, the mean of "
            + ", ".join(f"{t['rows_per_s']:,.0f}" for t in ceiling["runs"])
            + f" (p50 {ceiling['p50_ms']:.2f} ms).",
            "",
            *(
                f"- {text}: {'-' if value is None else f'{value:.2f}'}"
                for key, text in GOAL_LINES.items()
                for value in [summary["goals"][key]]
            ),
        ]
    return "\n".join(lines) + "\n"
