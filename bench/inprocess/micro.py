"""`mlet bench micro`: in-process latency, throughput and memory per model and backend.

Every repetition of every model runs in a fresh process, so that one model's memory never
counts against another's and each starts cold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.stats import median_and_spread
from mlet.files import write_json
from mlet.repository import open_model

DEFAULT_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)


@dataclass
class MicroConfig:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES
    min_iterations: int = 20
    min_seconds: float = 1.0
    warmup: int = 10
    threads: int = 0
    repetitions: int = 3


@dataclass(frozen=True)
class Target:
    """What to measure: an exported model folder (ONNX Runtime) or a run (PyTorch)."""

    name: str
    path: Path
    backend: str = "onnxruntime"  # or "pytorch"


def measure(target: Target, config: MicroConfig) -> dict:
    """One repetition, in this process: load, memory, warm-up, timing per batch size."""
    from bench.inprocess.timing import memory_snapshot, onnxruntime_model, time_batch
    from bench.load.request_bodies import RequestFactory
    from mlet.runtime import SessionOptions, torch_runner

    before = memory_snapshot()
    if target.backend == "pytorch":
        runner, spec = torch_runner(target.path, config.threads)
    else:
        runner, spec = onnxruntime_model(target.path, SessionOptions(config.threads))
    loaded = memory_snapshot(target.path)
    factory = RequestFactory(spec)
    timings = [
        asdict(
            time_batch(runner, factory, b, config.min_iterations, config.min_seconds, config.warmup)
        )
        for b in config.batch_sizes
        if b <= spec.max_batch_size
    ]
    warmed = memory_snapshot(target.path)
    return {"before_load": before, "after_load": loaded, "after_warmup": warmed, "timings": timings}


def measure_in_subprocess(target: Target, config: MicroConfig) -> dict:
    payload = json.dumps(
        {"target": {**asdict(target), "path": str(target.path)}, "config": asdict(config)}
    )
    result = subprocess.run(
        [sys.executable, "-m", "bench.inprocess.micro", payload], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring {target.name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_bytes(target: Target) -> int:
    if target.backend == "pytorch":
        return (target.path / "model.safetensors").stat().st_size
    return open_model(target.path).manifest.model_bytes


def run_micro(targets: list[Target], config: MicroConfig, progress: bool = True) -> list[dict]:
    """Measure every target `repetitions` times, interleaved, and summarise per batch size."""
    repetitions: dict[str, list[dict]] = {t.name: [] for t in targets}
    for repetition in range(config.repetitions):
        for target in targets:
            repetitions[target.name].append(measure_in_subprocess(target, config))
            if progress:
                print(f"micro {target.name} #{repetition + 1} done", flush=True)
    return [summarise(t, repetitions[t.name]) for t in targets]


def run_micro_command(targets: list[Target], config: MicroConfig, out: Path) -> list[dict]:
    """`mlet bench micro`: measure, and write environment.json and micro.json into `out`."""
    from bench.environment import environment

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "environment.json", environment({"micro": str(config)}))
    results = run_micro(targets, config)
    write_json(out / "micro.json", results)
    return results


def micro_lines(results: list[dict]) -> list[str]:
    """One line per model and batch size: median p50, p99 and rows/s."""
    lines = []
    for m in results:
        for t in m["timings"]:
            p50, p99, rows = (t[k]["median"] for k in ("p50_ms", "p99_ms", "rows_per_s"))
            lines.append(
                f"{m['name']:>20} batch {t['batch']:>5}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
                f"{rows:,.0f} rows/s"
            )
    return lines


def summarise(target: Target, runs: list[dict]) -> dict:
    batches = [t["batch"] for t in runs[0]["timings"]]
    per_batch = []
    for i, batch in enumerate(batches):
        per_batch.append(
            {
                "batch": batch,
                "p50_ms": median_and_spread([r["timings"][i]["p50_ms"] for r in runs]),
                "p99_ms": median_and_spread([r["timings"][i]["p99_ms"] for r in runs]),
                "rows_per_s": median_and_spread([r["timings"][i]["rows_per_s"] for r in runs]),
            }
        )

    return {
        "name": target.name,
        "backend": target.backend,
        "path": str(target.path),
        "model_bytes": model_bytes(target),
        "rss_after_load_bytes": median_and_spread([r["after_load"]["rss_bytes"] for r in runs]),
        "rss_after_warmup_bytes": median_and_spread([r["after_warmup"]["rss_bytes"] for r in runs]),
        "rss_before_load_bytes": median_and_spread([r["before_load"]["rss_bytes"] for r in runs]),
        "mapped_model_resident_bytes": median_and_spread(
            [r["after_warmup"]["mapped_model_resident_bytes"] for r in runs]
        ),
        "mapped_model_files": runs[0]["after_warmup"].get("mapped_model_files"),
        "timings": per_batch,
        "raw": runs,
    }


def main() -> None:
    """Worker entry point: measure one target described by a JSON argument, print JSON."""
    payload = json.loads(sys.argv[1])
    target = Target(**{**payload["target"], "path": Path(payload["target"]["path"])})
    config = MicroConfig(
        **{**payload["config"], "batch_sizes": tuple(payload["config"]["batch_sizes"])}
    )
    print(json.dumps(measure(target, config)))


if __name__ == "__main__":
    main()
