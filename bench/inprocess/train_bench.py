"""`mlet bench train`: the TorchRec trainer against the loop it replaced, its memory, resume.

1. Speed: the training step (forward, backward with the tables' update, dense step) of a
   full d=D and an MLET k=K -> D model on 26 tables of `speed_rows` rows, timed by the
   study's overhead measurement (variants in turns, median of rounds), and the steps/s of
   one epoch of `mlet train` (data loading included); once with this checkout and once
   with a git worktree of `baseline`, the last commit before TorchRec, each in child
   processes of its own, whose peak resident memory is recorded too. The two trainers
   take turns, round by round and epoch by epoch, so that a shared host's changing load
   (it moves a step's time by 2x here within a minute) falls on both alike.
2. Memory: `mlet train` of MLET k=K -> D on a generated dataset with Criteo Kaggle's 26
   table sizes, one full pass, in a child process: its peak RSS (the kernel's high-water
   mark, os.wait4) against the bytes of what it trains (W1, W2, MLPs, optimizer state).
   Evaluation, checkpoints and the final save are inside that peak.
3. Resume: `mlet train` killed with SIGKILL after a checkpoint, then `--resume`d, against
   the same command uninterrupted; the two model.safetensors must be byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.inprocess.export_bench import KAGGLE_TABLE_SIZES, measure_child
from mlet.files import read_json, sha256_file, write_json
from mlet.markdown import markdown_table

BASELINE = "5173b20"  # the last commit whose trainer is the single-process loop

# Run inside a child, with the checkout under test (this one or the baseline) on its path.
# Each round of the study's overhead measurement waits for the parent's word, so that the
# two trainers' rounds take turns and a change in the host's load falls on both alike.
TIMING = """
import json, sys
from mlet.dataset import load_dataset
from study import overhead
options = json.loads(sys.argv[2])
known = {k: v for k, v in options.items() if k in overhead.OverheadConfig.__dataclass_fields__}
config = overhead.OverheadConfig(**known)
timed_run, variants, calls = overhead.Timed.run, len(overhead.variants(config)), [0]
def paced_run(self, batches):
    if calls[0] >= variants and calls[0] % variants == 0:  # past the warm-up: a new round
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise SystemExit("the parent stopped the timing")
    calls[0] += 1
    return timed_run(self, batches)
overhead.Timed.run = paced_run
result = overhead.measure_overhead(load_dataset(sys.argv[1]), config)
print("RESULT " + json.dumps(result), flush=True)
"""


@dataclass
class TrainBenchConfig:
    work: Path = Path(tempfile.gettempdir()) / "mlet-train-bench"
    baseline: str | None = BASELINE  # None: time this checkout only
    dim: int = 16
    hidden: int = 64
    speed_tables: int = 26
    speed_rows: int = 100_000  # rows of each table in the speed comparison
    speed_data_rows: int = 100_000
    steps: int = 100
    rounds: int = 5
    loop_repeats: int = 3  # epochs of `mlet train` per trainer and kind, in turns
    warmup_steps: int = 10
    batch_size: int = 512
    memory_tables: tuple[int, ...] = KAGGLE_TABLE_SIZES
    memory_data_rows: int = 20_000
    memory: bool = True
    resume: bool = True
    seed: int = 0
    results: dict = field(default_factory=dict)


def mlet_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def synth(folder: Path, rows: int, table_sizes: tuple[int, ...], seed: int) -> Path:
    if not (folder / "schema.json").is_file():
        sizes = ",".join(str(n) for n in table_sizes)
        subprocess.run(
            mlet_command("data", "synth", "--out", str(folder), "--rows", str(rows),
                         "--table-sizes", sizes, "--seed", str(seed)),
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return folder


def tree_env(tree: Path | None) -> dict:
    """The environment of a child that runs the code at `tree` (None: this checkout)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def baseline_tree(work: Path, commit: str) -> Path:
    """A git worktree of `commit` (made once), to run the trainer it had."""
    tree = work / f"baseline-{commit}"
    if not tree.is_dir():
        root = Path(__file__).resolve().parents[2]
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", str(tree), commit],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    return tree


class PacedChild:
    """A timing child (TIMING) that runs one round each time it is told to."""

    def __init__(self, command: list[str], tree: Path | None) -> None:
        # stderr to a file, not a pipe, so that a chatty child never blocks; closed by close()
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, env=tree_env(tree), cwd=tree,
        )  # fmt: skip
        self.result: dict | None = None

    def wait(self) -> bool:
        """Until the child is ready for a round (True) or has printed its result (False)."""
        for line in self.process.stdout:
            if line.startswith("READY"):
                return True
            if line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT ") :])
                return False
        self.log.seek(0)
        raise RuntimeError(f"a timing child failed:\n{self.log.read()[-4000:]}")

    def go(self) -> None:
        self.process.stdin.write("GO\n")
        self.process.stdin.flush()

    def close(self) -> int:
        """Wait for the child; its own peak RSS (os.wait4: this child alone)."""
        self.process.stdin.close()
        _, _, usage = os.wait4(self.process.pid, 0)
        self.log.close()
        return usage.ru_maxrss * 1024


def time_steps(data: Path, config: TrainBenchConfig, trees: dict[str, Path | None]) -> dict:
    """Step times of full and MLET for each trainer (name -> code tree, None: this one).

    Every trainer runs in a child of its own; their rounds alternate, one child at a time.
    """
    options = {
        "dim": config.dim,
        "hidden": [config.hidden],
        "batch_size": config.batch_size,
        "steps": config.steps,
        "rounds": config.rounds,
        "warmup_steps": config.warmup_steps,
        "device": "cpu",
        "with_dense_gradients": False,  # the baseline's extra variants, not timed here
        "with_torch_adagrad": False,
    }
    command = [sys.executable, "-c", TIMING, str(data), json.dumps(options)]
    children = {name: PacedChild(command, tree) for name, tree in trees.items()}
    try:
        waiting = {name: child.wait() for name, child in children.items()}  # warm-ups done
        while any(waiting.values()):
            for name, child in children.items():
                if waiting[name]:
                    child.go()
                    waiting[name] = child.wait()
        peaks = {name: child.close() for name, child in children.items()}
    finally:
        for child in children.values():
            if child.process.poll() is None:
                child.process.kill()
    full, mlet = f"full d={config.dim}", f"mlet d={config.dim} k={config.hidden}"
    timings = {}
    for name, child in children.items():
        rows = {r["label"]: r["total_ms"] for r in child.result["rows"]}
        timings[name] = {"full_ms": rows[full], "mlet_ms": rows[mlet],
                         "peak_rss_bytes": peaks[name]}  # fmt: skip
    return timings


def loop_speed(data: Path, config: TrainBenchConfig, trees: dict[str, Path | None]) -> dict:
    """Steps/s of one epoch of `mlet train` (data loading included) for each trainer: the
    median of `loop_repeats` epochs, the trainers taking turns."""
    samples: dict = {name: {"full": [], "mlet": []} for name in trees}
    for _ in range(config.loop_repeats):
        for name, tree in trees.items():
            for kind in ("full", "mlet"):
                run = (config.work / f"loop-{kind}-{name}").resolve()
                shutil.rmtree(run, ignore_errors=True)
                command = train_args(data.resolve(), run, config, "--epochs", "1", embedding=kind)
                subprocess.run(command, check=True, capture_output=True, env=tree_env(tree),
                               cwd=tree)  # fmt: skip
                samples[name][kind].append(read_json(run / "metrics.json")["steps_per_second"])
                shutil.rmtree(run, ignore_errors=True)
    return {
        name: {f"{kind}_steps_per_s": float(np.median(values)) for kind, values in kinds.items()}
        for name, kinds in samples.items()
    }


def trained_bytes(table_sizes: tuple[int, ...], dim: int, hidden: int) -> dict:
    """Bytes of what MLET training holds: W1, W2, MLPs and both optimizers' state."""
    from mlet.dlrm import build_config, build_mlps

    model = build_config(13, list(table_sizes), "mlet", dim, hidden)
    mlps = sum(p.numel() for m in build_mlps(model) for p in m.parameters())
    rows = sum(table_sizes)
    projections = len(table_sizes) * hidden * dim
    return {
        "w1": 4 * rows * hidden,
        "w2": 4 * projections,
        "mlps": 4 * mlps,
        "table_state": 4 * rows,  # row-wise Adagrad: one float a row
        "dense_state": 4 * (projections + mlps),  # Adagrad's sum for each dense parameter
    }


def train_args(
    data: Path, out: Path, config: TrainBenchConfig, *extra: str, embedding: str = "mlet"
) -> list[str]:
    """`mlet train` of the bench's model; options both trainers, old and new, take."""
    hidden = ("--hidden", str(config.hidden)) if embedding == "mlet" else ()
    return mlet_command(
        "train", "--data", str(data), "--out", str(out), "--embedding", embedding,
        "--dim", str(config.dim), *hidden,
        "--batch-size", str(config.batch_size), "--seed", str(config.seed), *extra,
    )  # fmt: skip


def measure_memory(config: TrainBenchConfig) -> dict:
    data = synth(config.work / "kaggle-data", config.memory_data_rows, config.memory_tables,
                 config.seed)  # fmt: skip
    run = config.work / "kaggle-run"
    shutil.rmtree(run, ignore_errors=True)
    measured = measure_child(train_args(data, run, config, "--epochs", "1"))
    parts = trained_bytes(config.memory_tables, config.dim, config.hidden)
    total = sum(parts.values())
    metrics = read_json(run / "metrics.json")
    shutil.rmtree(run, ignore_errors=True)
    return {
        "tables": len(config.memory_tables),
        "rows": sum(config.memory_tables),
        "parameter_bytes": parts,
        "trained_bytes": total,
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "peak_over_trained": measured["peak_rss_bytes"] / total,
        "seconds": measured["seconds"],
        "steps": metrics["steps"],
        "steps_per_second": metrics["steps_per_second"],
    }


def measure_resume(data: Path, config: TrainBenchConfig) -> dict:
    """Byte-identical weights after a SIGKILL and --resume, against an uninterrupted run."""
    extra = ("--epochs", "2", "--checkpoint-every", "20", "--patience", "9")
    whole, killed = config.work / "resume-whole", config.work / "resume-killed"
    for run in (whole, killed, killed.parent / f"{killed.name}.checkpoints"):
        shutil.rmtree(run, ignore_errors=True)
    subprocess.run(train_args(data, whole, config, *extra), check=True, capture_output=True)
    child = subprocess.Popen(train_args(data, killed, config, *extra),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pointer = killed.parent / f"{killed.name}.checkpoints" / "checkpoints.json"
    while child.poll() is None and not (pointer.is_file() and read_json(pointer).get("latest")):
        time.sleep(0.01)
    killed_at = read_json(pointer)["latest"] if pointer.is_file() else None
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait()
    subprocess.run(mlet_command("train", "--resume", str(killed)), check=True,
                   capture_output=True)  # fmt: skip
    same = sha256_file(whole / "model.safetensors") == sha256_file(killed / "model.safetensors")
    return {"killed_after": killed_at, "identical_weights": same}


def run_train_bench(config: TrainBenchConfig, out: Path) -> dict:
    config.work.mkdir(parents=True, exist_ok=True)
    sizes = (config.speed_rows,) * config.speed_tables
    data = synth(config.work / "speed-data", config.speed_data_rows, sizes, config.seed)
    results: dict = {"config": {k: str(v) for k, v in asdict(config).items() if k != "results"}}
    trees: dict[str, Path | None] = {"torchrec": None}
    if config.baseline:
        trees["baseline"] = baseline_tree(config.work, config.baseline)
    print(f"timing the training step of {' and '.join(trees)}, in turns ...", flush=True)
    steps = time_steps(data, config, trees)
    print("timing one epoch of `mlet train` ...", flush=True)
    loops = loop_speed(data, config, trees)
    for name in trees:
        results[name] = {**steps[name], **loops[name]}
    if config.baseline:
        new, old = results["torchrec"], results["baseline"]
        for kind in ("full", "mlet"):
            results[f"{kind}_step_speedup"] = old[f"{kind}_ms"] / new[f"{kind}_ms"]
            results[f"{kind}_loop_speedup"] = (
                new[f"{kind}_steps_per_s"] / old[f"{kind}_steps_per_s"]
            )
    new = results["torchrec"]
    results["mlet_over_full"] = new["mlet_ms"] / new["full_ms"]
    results["mlet_over_full_loop"] = new["full_steps_per_s"] / new["mlet_steps_per_s"]
    if config.memory:
        print("training MLET at Criteo Kaggle's table sizes ...", flush=True)
        results["memory"] = measure_memory(config)
    if config.resume:
        print("killing and resuming a run ...", flush=True)
        results["resume"] = measure_resume(data, config)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train.json", results)
    (out / "train.md").write_text(report(results))
    return results


def report(results: dict) -> str:
    config = results["config"]
    d, k = config["dim"], config["hidden"]
    lines = [
        f"# `mlet bench train`\n\nStep of full d={d} and MLET k={k} -> d={d}, batch "
        f"{config['batch_size']}, {config['speed_tables']} tables of {config['speed_rows']} "
        f"rows, median of {config['rounds']} rounds of {config['steps']} steps, each trainer "
        "in a child process of its own.\n",
    ]
    rows = [["TorchRec (this checkout)", *_speed(results["torchrec"])]]
    if "baseline" in results:
        rows.append([f"single-process loop ({config['baseline']})", *_speed(results["baseline"])])
    header = ["trainer", f"full d={d} ms", f"MLET k={k} ms", "MLET / full", "peak RSS",
              "full steps/s", "MLET steps/s", "MLET / full"]  # fmt: skip
    lines.append(markdown_table(header, rows, "lrrrrrrr"))
    lines.append(
        "\nms: the step alone on batches held in memory (the study's overhead measurement); "
        "steps/s: one epoch of `mlet train`, reading the dataset as it trains."
    )
    if "baseline" in results:
        lines.append(
            f"\nSpeed-up of TorchRec, step alone: {results['full_step_speedup']:.2f}x full, "
            f"{results['mlet_step_speedup']:.2f}x MLET; in the training loop: "
            f"{results['full_loop_speedup']:.2f}x full, {results['mlet_loop_speedup']:.2f}x MLET."
        )
    if "memory" in results:
        m = results["memory"]
        lines.append(
            f"\nMLET k={k} -> d={d} at {m['tables']} tables of {m['rows']:,} rows, one pass "
            f"({m['steps']} steps, {m['seconds']:.0f} s with checkpoint and save): peak RSS "
            f"{m['peak_rss_bytes'] / 2**30:.2f} GiB for {m['trained_bytes'] / 2**30:.2f} GiB "
            f"trained, **{m['peak_over_trained']:.3f}x**."
        )
    if "resume" in results:
        r = results["resume"]
        lines.append(
            f"\nKilled (SIGKILL) after checkpoint {r['killed_after']} and resumed: weights "
            + (
                "byte-identical to the uninterrupted run."
                if r["identical_weights"]
                else "**differ** from the uninterrupted run."
            )  # fmt: skip
        )
    return "\n".join(lines) + "\n"


def _speed(entry: dict) -> list[str]:
    full, mlet = entry["full_steps_per_s"], entry["mlet_steps_per_s"]
    return [f"{entry['full_ms']:.2f}", f"{entry['mlet_ms']:.2f}",
            f"{entry['mlet_ms'] / entry['full_ms']:.2f}x",
            f"{entry['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{full:.1f}", f"{mlet:.1f}", f"{full / mlet:.2f}x"]  # fmt: skip
