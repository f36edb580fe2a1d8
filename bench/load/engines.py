"""`mlet bench engines`: our server and Triton, the same model under the same load.

The engines themselves (ours, real Triton, a server at a URL) are bench/load/servers.py's.
`mlet bench engines` serves one model with each engine and drives them with the same
requests, the same connections and the same duration: 1-row requests, then 256-row ones,
and with `raw` 1-row requests of logged columns to the model's NAME-raw ensemble, whose
p99 against the id path's is what the transform step costs.

Over HTTP (`protocol="http"`) the 1-row requests are JSON and the 256-row ones binary, and
the load generator is wrk (compiled, event-driven; `make test` installs Debian's package).
Over gRPC the requests are ModelInferRequests with raw_input_contents, and the generator is
h2load (bench/load/grpc_load.py), each load framed by a check of its answer through
grpcio. Where the compiled generator is missing, several Locust processes (HTTP or gRPC
users) generate the load. Its CPU is reported beside the server's, so that a reader sees
whether the generator or the server was the limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.environment import environment
from bench.load.grpc_load import check_answers, checked_request, h2load_missing_reason, run_h2load
from bench.load.load_test import (
    LoadConfig,
    children_cpu_seconds,
    read_locust_stats,
    run_locust,
    warm_up_folder,
)
from bench.load.request_bodies import (
    RawRequestFactory,
    RequestFactory,
    require_raw_models,
    served_models,
    served_name,
)
from bench.load.servers import ENGINES, Engine, ProcessTree, running_engine
from mlet.files import write_json
from mlet.infer_request import grpc_request, http_body
from mlet.raw_rows import RAW_SUFFIX
from mlet.repository import open_model
from mlet.transform import load_transform
from serve.process import HOST, free_port

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


def run_locust_load(target, model, folder: Path, load, config, out: Path) -> dict:
    """Locust processes against `target` (gRPC: host:port) calling `model`."""
    settings = LoadConfig(
        users=config.connections,
        duration=config.duration,
        rows=load.rows,
        binary=load.binary,
        locust_processes=config.locust_processes,
        protocol=config.protocol,
        raw=load.raw,
    )
    prefix = out / f"locust-{model}-{load.rows}"
    run_locust(target, model, folder, settings, prefix)
    return read_locust_stats(prefix)


# -- mlet bench engines -------------------------------------------------------------------

GENERATORS = ("auto", "wrk", "h2load", "locust")
NATIVE_GENERATOR = {"http": "wrk", "grpc": "h2load"}  # compiled, one per protocol
MISSING_REASON = {"wrk": wrk_missing_reason, "h2load": h2load_missing_reason}


@dataclass(frozen=True)
class Load:
    """One load of a run: rows per request, binary tensors (HTTP), raw logged columns to
    NAME-raw instead of ids to NAME."""

    rows: int
    binary: bool = False
    raw: bool = False

    def encoding(self, protocol: str) -> str:
        kind = "gRPC" if protocol == "grpc" else "binary" if self.binary else "JSON"
        return f"raw {kind}" if self.raw else kind


@dataclass
class EnginesConfig:
    engines: tuple[str, ...] = ENGINES
    duration: float = 20.0  # seconds per load
    connections: int = 32
    loads: tuple[tuple[int, bool], ...] = ((1, False), (256, True))  # (rows, binary)
    generator: str = "auto"  # wrk (HTTP) | h2load (gRPC) | locust | auto (the compiled one)
    locust_processes: int = 2
    pool: int = 64  # distinct request bodies per load, the same for every engine
    tritonserver: str | None = None
    # Our server once more with batching off, on the 1-row load: what batching buys.
    batching_off: bool = True
    rounds: int = 4  # each load's duration is split into rounds that alternate the engines
    protocol: str = "http"  # http | grpc: how every load reaches the engines
    raw: bool = False  # also a 1-row load of logged columns on NAME-raw (ensemble)

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise ValueError(f"engines must be among {ENGINES}, got {list(self.engines)}")
        if self.protocol not in NATIVE_GENERATOR:
            raise ValueError(f"protocol must be http or grpc, got {self.protocol!r}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        native = NATIVE_GENERATOR[self.protocol]
        if self.generator in MISSING_REASON and self.generator != native:
            raise ValueError(
                f"{self.generator} does not load {self.protocol}: use {native} or locust"
            )
        if self.connections < 1 or self.rounds < 1 or self.duration / self.rounds < 1:
            raise ValueError("connections and rounds must be positive, each round >= 1 s")

    def chosen_generator(self) -> str:
        native = NATIVE_GENERATOR[self.protocol]
        missing = MISSING_REASON[native]()
        if self.generator == "auto":
            return native if missing is None else "locust"
        if self.generator == native and missing is not None:
            raise RuntimeError(missing)
        return self.generator

    def all_loads(self) -> list[Load]:
        """The loads in order: config.loads, then (raw) 1-row raw columns."""
        loads = [Load(rows, binary) for rows, binary in self.loads]
        return loads + ([Load(1, raw=True)] if self.raw else [])


@dataclass
class Served:
    """An engine serving the model: its URL, gRPC endpoint (gRPC runs), process tree and
    resident bytes once loaded."""

    url: str
    tree: ProcessTree
    rss_loaded: float
    grpc_address: str | None = None

    def target(self, protocol: str) -> str:
        return self.grpc_address if protocol == "grpc" else self.url


def measure_load(served: Served, folder: Path, load: Load, bodies, checked, config, out):
    """One load of `config.duration / config.rounds` seconds against a running engine,
    with both sides' CPU and the server's memory; gRPC loads framed by the answer check."""
    generator = config.chosen_generator()
    seconds = config.duration / config.rounds
    target, model = served.target(config.protocol), served_name(folder, load.raw)
    differences = [check_answers(target, checked)] if checked else []
    server_cpu, client_cpu = sum(served.tree.cpu_times()), children_cpu_seconds()
    started = time.monotonic()
    if generator == "wrk":
        stats = run_wrk(served.url, f"/v2/models/{model}/infer", bodies, config.connections,
                        seconds)  # fmt: skip
    elif generator == "h2load":
        stats = run_h2load(target, bodies[0], config.connections, seconds)
    else:
        load_config = dataclasses.replace(config, duration=seconds, rounds=1)
        stats = run_locust_load(target, model, folder, load, load_config, out)
    elapsed = time.monotonic() - started
    figures = {
        **stats,
        "elapsed_s": elapsed,
        "server_cpu_s": sum(served.tree.cpu_times()) - server_cpu,
        "client_cpu_s": children_cpu_seconds() - client_cpu,
        "server_rss_bytes": served.tree.memory_info().rss,
    }
    if checked:
        differences.append(check_answers(target, checked))
        figures |= {"answers_checked": 2 * len(checked), "answer_max_diff": max(differences)}
    return figures


def combine_rounds(
    label: str, load: Load, rounds: list[dict], rss: float, generator: str, protocol: str
) -> dict:
    """One engine's figures on one load from its interleaved rounds: totals over time for
    rates and CPU, the mean of the rounds' percentiles, every round kept."""
    elapsed = sum(r["elapsed_s"] for r in rounds)
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["requests"] / r["requests_per_s"] for r in rounds if r["requests_per_s"])
    requests_per_s = requests / seconds if seconds else 0.0
    percentiles = [k for k in ("p50_ms", "p99_ms", "p999_ms") if all(k in r for r in rounds)]
    combined = {
        "engine": label,
        "server_rss_loaded_bytes": rss,
        "requests": requests,
        "failures": sum(r["failures"] for r in rounds),
        "requests_per_s": requests_per_s,
        "rows_per_request": load.rows,
        "encoding": load.encoding(protocol),
        "rows_per_s": requests_per_s * load.rows,
        **{key: statistics.mean(r[key] for r in rounds) for key in percentiles},
        "max_ms": max(r["max_ms"] for r in rounds),
        "server_cpu_cores": sum(r["server_cpu_s"] for r in rounds) / elapsed,
        "client_cpu_cores": sum(r["client_cpu_s"] for r in rounds) / elapsed,
        "server_rss_bytes": max(r["server_rss_bytes"] for r in rounds),
        "generator": generator,
        "protocol": protocol,
        "raw": load.raw,
        "rounds": rounds,
    }
    if all("answers_checked" in r for r in rounds):
        combined["answers_checked"] = sum(r["answers_checked"] for r in rounds)
        combined["answer_max_diff"] = max(r["answer_max_diff"] for r in rounds)
    return combined


def draw_pools(folder: Path, loads: list[Load], size: int) -> dict[Load, list]:
    """Each load's `size` requests (inputs), drawn once: every engine gets the very same."""
    factories = {False: RequestFactory(open_model(folder).manifest.spec, seed=7)}
    if any(load.raw for load in loads):
        factories[True] = RawRequestFactory(load_transform(folder), seed=7)
    return {load: [factories[load.raw].tensors(load.rows) for _ in range(size)] for load in loads}


def encoded(folder: Path, load: Load, pool: list, protocol: str) -> list:
    """A pool as the generator sends it: HTTP (body, headers), or ModelInferRequests."""
    if protocol == "grpc":
        return [grpc_request(served_name(folder, load.raw), tensors) for tensors in pool]
    return [http_body(tensors, load.binary, binary_output=load.binary) for tensors in pool]


def run_engines(repo: str | Path, model: str, config: EnginesConfig, out: str | Path) -> dict:
    """Every engine serves the model at once, and each load drives one engine at a time, in
    rounds that alternate the engines, so that a machine whose speed drifts (shared cores)
    moves every side of a ratio alike. Writes engines.json and engines.md."""
    repo, out = Path(repo), Path(out)
    folder = repo / model
    if config.raw:
        require_raw_models(repo, [model])
    loads = config.all_loads()
    pools = draw_pools(folder, loads, config.pool)
    bodies = {load: encoded(folder, load, pools[load], config.protocol) for load in loads}
    checked = {}  # gRPC: the request h2load sends, checked before and after each load
    if config.protocol == "grpc":
        checked = {
            load: [checked_request(folder, load.raw, served_name(folder, load.raw), pools[load][0])]
            for load in loads
        }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    generator_note = ""
    if config.chosen_generator() == "locust":
        missing = MISSING_REASON[NATIVE_GENERATOR[config.protocol]]()
        processes = f"{config.locust_processes} Locust processes generate the load"
        generator_note = f"{missing}: {processes}" if missing else f"as asked, {processes}"
        print(generator_note if missing else "load generator: Locust (as asked)", flush=True)
    runs = [(name, name, (), loads) for name in config.engines]
    if config.batching_off and "mlet" in config.engines:
        small = [load for load in loads if load.rows == 1 and not load.raw]
        runs.append(("mlet", "mlet, batching off", ("--batching", "off"), small))
    largest = max(load.rows for load in loads if not load.raw)
    results, ceilings = [], []
    with contextlib.ExitStack() as stack:
        servers = start_engines(stack, runs, repo, model, config, out)
        for load in loads:
            labels = [label for _, label, _, run_loads in runs if load in run_loads]
            batched = load.rows == largest and not load.raw
            rounds = interleaved_rounds(
                servers, labels, folder, load, bodies[load], checked.get(load), config, out,
                ceilings if batched else None,
            )  # fmt: skip
            for label in labels:
                rss, generator = servers[label].rss_loaded, config.chosen_generator()
                results.append(
                    combine_rounds(label, load, rounds[label], rss, generator, config.protocol)
                )
    ceiling = mean_ceiling(ceilings or [inprocess_ceiling(folder, largest)])
    floor = None
    if config.protocol == "grpc" and config.chosen_generator() == "h2load":
        one_row = next(load for load in loads if load.rows == 1 and not load.raw)
        floor = grpc_floor(bodies[one_row][0], config)
    summary = {
        "model": model,
        "config": asdict(config),
        "environment": environment({"engines": str(config)}),
        "generator_note": generator_note,
        "results": results,
        "inprocess": ceiling,
        "goals": goal_ratios(results, ceiling, config.raw),
        "grpc_floor": floor,
    }
    write_json(out / "engines.json", summary)
    (out / "engines.md").write_text(
        engines_markdown(model, config, results, generator_note, summary)
    )
    return summary


def grpc_floor(request, config: EnginesConfig) -> dict:
    """The 1-row gRPC load against grpc.aio doing no work (bench/load/grpc_floor.py): what
    a Python gRPC server costs here before any inference."""
    port = free_port()
    command = [sys.executable, "-m", "bench.load.grpc_floor", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        tree = ProcessTree(process.pid)
        before = sum(tree.cpu_times())
        stats = run_h2load(f"{HOST}:{port}", request, config.connections, config.duration)
        cpu = sum(tree.cpu_times()) - before
    finally:
        process.terminate()
        process.wait(timeout=30)
    calls = stats["requests"] + stats["failures"]
    return {
        **stats,
        "seconds": config.duration,
        "cpu_s": cpu,
        "cpu_ms_per_call": 1000 * cpu / max(calls, 1),
    }


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the grpc.aio floor server exited ({process.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the grpc.aio floor server did not listen on port {port}")


def floor_lines(summary: dict, results: list[dict]) -> list[str]:
    floor = summary.get("grpc_floor")
    if not floor:
        return []
    per_call = [
        f"{r['engine']} {r['server_cpu_cores'] / r['requests_per_s'] * 1000:.3f} ms"
        for r in results
        if r["rows_per_request"] == 1 and not r.get("raw") and r["requests_per_s"]
    ]
    return [
        "",
        f"grpc.aio alone (bench/load/grpc_floor.py: a Python ModelInfer that returns a fixed "
        f"answer, under the same 1-row h2load load for {floor['seconds']:g} s): "
        f"{floor['requests_per_s']:,.0f} requests/s, p99 {floor['p99_ms']:.2f} ms, "
        f"{floor['cpu_ms_per_call']:.3f} ms of CPU per call. Server CPU per 1-row call: "
        + ", ".join(per_call)
        + ".",
    ]


def start_engines(stack, runs, repo: Path, model: str, config: EnginesConfig, out: Path):
    """Start every engine of `runs` (gRPC runs: with a gRPC port each): label -> Served."""
    servers = {}
    for name, label, options, _ in runs:
        engine = Engine(name=name, tritonserver=config.tritonserver)
        log = out / f"{name}.log" if name == "triton" else None  # its backends, its loads
        port = free_port() if config.protocol == "grpc" else None
        url, server = stack.enter_context(
            running_engine(engine, repo, served_models(model, config.raw), *options,
                           timeout=120.0, log=log, grpc_port=port)
        )  # fmt: skip
        address = engine.grpc_address(port) if port is not None else None
        servers[label] = Served(url, server, server.memory_info().rss, address)
    return servers


def interleaved_rounds(servers, labels, folder, load, bodies, checked, config, out, ceilings):
    """`config.rounds` rounds of one load, each engine in turn: label -> its rounds.

    With `ceilings` (a list), in-process ONNX Runtime is timed just before and just after
    each round of our server, so that the ceiling shares that load's machine."""
    warm = LoadConfig(rows=load.rows, binary=load.binary, protocol=config.protocol, raw=load.raw)
    for label in labels:
        warm_up_folder(servers[label].target(config.protocol), folder, warm)
    rounds: dict[str, list[dict]] = {label: [] for label in labels}
    for number in range(1, config.rounds + 1):
        for label in labels:
            adjacent = ceilings is not None and label == "mlet"
            if adjacent:
                ceilings.append(inprocess_ceiling(folder, load.rows))
            figures = measure_load(servers[label], folder, load, bodies, checked, config, out)
            if adjacent:
                ceilings.append(inprocess_ceiling(folder, load.rows))
            rounds[label].append({"round": number, **figures})
            rate = figures["requests_per_s"] * load.rows
            kind = "-row raw" if load.raw else "-row"
            print(f"{label}, {load.rows}{kind}, round {number}: {rate:,.0f} rows/s", flush=True)
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


def goal_ratios(results: list[dict], ceiling: dict, raw: bool = False) -> dict:
    """Ours against Triton, batching on against off, ours against in-process ONNX Runtime,
    and (raw) the raw-row path against the id path on each engine, from the results of one
    run (None where a side was not measured)."""

    def figure(engine: str, rows: int, key: str, raw_load: bool = False) -> float | None:
        found = [
            r[key]
            for r in results
            if r["engine"] == engine and r["rows_per_request"] == rows
            and r.get("raw", False) == raw_load
        ]  # fmt: skip
        return found[0] if found else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    largest = ceiling["batch"]
    goals = {
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
    if raw:
        for engine in ENGINES:
            goals[f"p99_raw_over_id_1row_{engine}"] = ratio(
                figure(engine, 1, "p99_ms", raw_load=True), figure(engine, 1, "p99_ms")
            )
    return goals


def goal_lines(protocol: str = "http", raw: bool = False) -> dict[str, str]:
    """What each goal ratio says, for the run's protocol."""
    small = "gRPC" if protocol == "grpc" else "JSON"
    lines = {
        "requests_ours_over_triton_1row": f"1-row {small} requests/s, ours / Triton (goal >= 1)",
        "p99_ours_over_triton_1row": f"1-row {small} p99, ours / Triton (goal <= 1)",
        "rows_ours_over_triton_batched": "batched rows/s, ours / Triton (goal >= 1)",
        "rows_ours_over_inprocess_batched": "batched rows/s, ours / in-process ONNX Runtime "
        "(goal >= 0.8)",
        "requests_batching_on_over_off_1row": "1-row requests/s, batching on / off (goal >= 2)",
        "p99_batching_on_over_off_1row": "1-row p99, batching on / off (goal <= 1)",
    }
    if raw:
        lines["p99_raw_over_id_1row_mlet"] = (
            f"1-row {small} p99, raw rows / ids, ours (goal <= 1.5)"
        )
        lines["p99_raw_over_id_1row_triton"] = f"1-row {small} p99, raw rows / ids, Triton"
    return lines


def engines_markdown(
    model: str, config: EnginesConfig, results: list[dict], note="", summary: dict | None = None
) -> str:
    generator = results[0]["generator"] if results else config.generator
    over = " over gRPC" if config.protocol == "grpc" else ""
    lines = [
        f"Engines on {model}{over}: {config.connections} connections, {config.duration:g} s "
        f"per load per engine in {config.rounds} rounds that alternate the engines (all "
        f"serving, one loaded at a time), load generator {generator}, same request bodies. "
        f"Rates are totals over the rounds, latencies the mean of the rounds' percentiles.",
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
        *protocol_notes(model, config, results),
    ]
    if summary is not None:
        lines += floor_lines(summary, results)
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
                for key, text in goal_lines(config.protocol, config.raw).items()
                for value in [summary["goals"][key]]
            ),
        ]
    return "\n".join(lines) + "\n"


def protocol_notes(model: str, config: EnginesConfig, results: list[dict]) -> list[str]:
    """What gRPC and raw loads sent, and the answer check of gRPC loads."""
    notes = []
    if config.raw:
        notes.append(
            f"Raw loads: 1-row requests of logged columns to {model}{RAW_SUFFIX} (the "
            "ensemble: its transform step, then the model), values its transform accepts, "
            "drawn by bench/load/request_bodies.py's RawRequestFactory."
        )
    checked = [r for r in results if "answers_checked" in r]
    if checked:
        count = sum(r["answers_checked"] for r in checked)
        worst = max(r["answer_max_diff"] for r in checked)
        h2load = checked[0]["generator"] == "h2load"
        blind = "; h2load itself sees HTTP statuses only" if h2load else ""
        notes.append(
            f"gRPC answers checked: a request of each load sent through grpcio before and "
            f"after every round, {count} calls, each equal to ONNX Runtime in this process "
            f"within the model's tolerance (largest difference {worst:.1e}){blind}."
        )
    return notes
