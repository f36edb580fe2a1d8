"""`mlet bench data`: the conversion engine against the per-line reader it replaces.

One run generates a Criteo-format TSV file (vectorised, seconds per million rows), then
converts it in separate processes on the same file: the per-line reader
(`data.criteo.convert`, kept as it was) and the engine with vocabularies and with
hashing, interleaved for `repetitions` rounds, each reader's fastest run reported. Each
process reports its own wall time and peak resident memory (ru_maxrss), so imports of
one never count against another. The engine also converts a file four times longer to
show that its peak memory does not grow with the file. Rows/s are projected to Criteo
Kaggle (45,840,617 lines) and one Terabyte day (~195M lines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from bench.environment import environment
from mlet.files import write_json

KAGGLE_LINES = 45_840_617
TERABYTE_DAY_LINES = 195_000_000
ENGINES = ("old", "vocab", "hash")


@dataclass(frozen=True)
class DataBenchConfig:
    rows: int = 1_000_000
    memory_rows: tuple[int, ...] = (1_000_000, 4_000_000)
    repetitions: int = 3  # each reader's best run counts: the machine may be shared
    seed: int = 0


def hex_column(values: np.ndarray, empty: np.ndarray) -> pa.Array:
    """32-bit values as 8 lower-case hex digits; `empty` rows are empty strings."""
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    shifts = np.arange(28, -4, -4, dtype=np.uint32)
    text = digits[(values.astype(np.uint32)[:, None] >> shifts) & 0xF]  # [n, 8]
    return pa.array(text.view("S8").ravel(), pa.binary(), mask=empty)


def generate_criteo(path: Path, rows: int, seed: int = 0, chunk: int = 250_000) -> None:
    """A Criteo-format TSV: Zipf-distributed hashes, empty values and negative counts."""
    rng = np.random.default_rng(seed)
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with open(path, "wb") as f:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            columns = [pa.array(rng.random(n) < 0.25).cast(pa.int8()).cast(pa.string())]
            for i in range(13):
                counts = np.floor(rng.exponential(20.0 * (i + 1), n)).astype(np.int64) - (i == 1)
                columns.append(pa.array(counts, mask=rng.random(n) < 0.2).cast(pa.string()))
            for t in range(26):
                ranks = rng.zipf(1.1 + 0.02 * t, n) % (10 ** (2 + t % 5))
                hashes = (ranks * 2654435761 + t * 97) % (1 << 32)
                columns.append(hex_column(hashes, rng.random(n) < 0.05))
            pacsv.write_csv(pa.table(columns, names=names), f, options)


def stolen_seconds() -> float | None:
    """CPU seconds the hypervisor gave to other guests so far, over all CPUs (the steal
    column of /proc/stat); None where the kernel does not say."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(file: Path, engine: str, out: Path) -> dict:
    """Convert `file` with one engine in this process: seconds, peak memory, and the CPU
    time the host took away meanwhile (a run it took much from is slower for that)."""
    stolen_before = stolen_seconds()
    started = time.perf_counter()
    if engine == "old":
        from data.criteo import CriteoConfig, convert

        schema = convert(file, out, CriteoConfig())
    else:
        from data.engine import ConvertConfig, convert
        from data.formats import criteo_format

        schema = convert(file, criteo_format(), out, ConvertConfig(encoding=engine, progress=False))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    stolen_after = stolen_seconds()
    stolen = None if None in (stolen_before, stolen_after) else stolen_after - stolen_before
    return {
        "engine": engine,
        "rows": schema.rows,
        "seconds": seconds,
        "peak_bytes": peak,
        "stolen_seconds": stolen,
    }


def measure_in_subprocess(file: Path, engine: str, work: Path) -> dict:
    out = work / f"out-{engine}-{file.stem}"
    command = [sys.executable, "-m", "bench.inprocess.data_bench", str(file), engine, str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    if result.returncode != 0:
        raise RuntimeError(f"{engine} on {file} failed:\n{result.stderr[-2000:]}")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_data_bench(config: DataBenchConfig, out: Path, work: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        files = {}
        for rows in sorted({config.rows, *config.memory_rows}):
            files[rows] = tmp / f"criteo-{rows}.tsv"
            started = time.perf_counter()
            generate_criteo(files[rows], rows, config.seed)
            print(f"generated {rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
        runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
        for repetition in range(config.repetitions):  # interleaved, so load drifts hit all
            for engine in ENGINES:
                runs[engine].append(measure_in_subprocess(files[config.rows], engine, tmp))
                print(f"{engine} #{repetition + 1}: {line(runs[engine][-1])}", flush=True)
        speed = {
            engine: min(entries, key=lambda e: e["seconds"]) for engine, entries in runs.items()
        }
        memory = {}
        for engine in ("hash", "vocab"):
            for rows in config.memory_rows:
                if rows == config.rows:
                    entry = speed[engine]
                else:
                    entry = measure_in_subprocess(files[rows], engine, tmp)
                memory[f"{engine} {rows}"] = entry
                print(f"{engine}, {rows:,} rows: {line(entry)}", flush=True)
        file_bytes = files[config.rows].stat().st_size
    results = {
        "config": asdict(config),
        "file_bytes": file_bytes,
        "speed": speed,
        "runs": runs,
        "memory": memory,
        "environment": environment({"data": str(config)}),
    }
    write_json(out / "data.json", results)
    (out / "data.md").write_text(report(results))
    return results


def rows_per_s(entry: dict) -> float:
    return entry["rows"] / entry["seconds"]


def line(entry: dict) -> str:
    stolen = entry.get("stolen_seconds")
    return (
        f"{entry['rows']:,} rows in {entry['seconds']:.2f} s ({rows_per_s(entry):,.0f} rows/s), "
        f"peak memory {entry['peak_bytes'] / 2**20:,.0f} MiB"
        + (f", {stolen:.1f} s of CPU stolen by the host" if stolen is not None else "")
    )


def report(results: dict) -> str:
    speed, old = results["speed"], results["speed"]["old"]
    rows = old["rows"]
    lines = [
        f"# Data conversion: {rows:,} Criteo-format rows "
        f"({results['file_bytes'] / 1e6:,.0f} MB), one run, same file, best of "
        f"{results['config']['repetitions']} interleaved runs each",
        "",
        "| reader | seconds | rows/s | vs per-line reader | peak memory | Kaggle (45.8M) "
        "| Terabyte day (195M) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, entry in speed.items():
        rate = rows_per_s(entry)
        lines.append(
            f"| {engine} | {entry['seconds']:.2f} | {rate:,.0f} | {rate / rows_per_s(old):.1f}x "
            f"| {entry['peak_bytes'] / 2**20:,.0f} MiB | {duration(KAGGLE_LINES / rate)} "
            f"| {duration(TERABYTE_DAY_LINES / rate)} |"
        )
    lines += ["", "Every interleaved run (CPU seconds the host took away, where it says):", ""]
    for engine, entries in results["runs"].items():
        lines.append(f"- {engine}: " + ", ".join(map(run_text, entries)))
    lines += [
        "",
        "Peak memory of the engine against file length (with vocabularies it also holds the",
        "counts of every distinct training value, which grow with the data, not the file):",
        "",
    ]
    for name, entry in results["memory"].items():
        lines.append(f"- {name.split()[0]}, {entry['rows']:,} rows: {line(entry)}")
    lines.append("")
    return "\n".join(lines)


def run_text(entry: dict) -> str:
    stolen = entry.get("stolen_seconds")
    return f"{entry['seconds']:.2f} s" + (f" ({stolen:.1f} s stolen)" if stolen is not None else "")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description="one measured conversion (used by the bench)")
    parser.add_argument("file", type=Path)
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(json.dumps(measure(args.file, args.engine, args.out)))


if __name__ == "__main__":
    main()
