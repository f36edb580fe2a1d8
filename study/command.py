"""`mlet study`: the grid, the overhead measurement and the report, in that order.

Each stage skips what is already on disk, so the command resumes after an interruption.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mlet.files import write_json
from study.findings import overhead_widths, write_report
from study.grid import StudyConfig, load_cells, open_study_data, quick_config, run_study
from study.overhead import OverheadConfig, measure_overhead, overhead_table

STAGES = ("all", "grid", "overhead", "report")


@dataclass(frozen=True)
class StudyCommand:
    data: str
    out: str | None = None
    quick: bool = False
    seeds: tuple[int, ...] | None = None
    regimes: list[str] | None = None
    max_rows: int | None = None  # 0 means every row
    workers: int = 1
    threads: int = 0
    device: str = "cpu"
    stage: str = "all"
    title: str | None = None
    grid: dict | None = None  # overrides of full_dims, mlet_dims, mlet_hidden, ... (a subset)
    optimizer: str | None = None  # the trainer's tables' optimizer (default rwsadagrad)
    # (MLET width, full width of equal accuracy) to time; default: the study's verdicts
    overhead_widths: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        widths = self.overhead_widths
        if widths is not None and (len(widths) != 2 or min(widths) < 1):
            raise ValueError(
                f"overhead widths are an MLET width and a full width, both positive, got {widths}"
            )

    def study_config(self) -> StudyConfig:
        config = quick_config() if self.quick else StudyConfig()
        options = {"workers": self.workers, "threads": self.threads, "device": self.device}
        if self.seeds:
            options["seeds"] = tuple(self.seeds)
        if self.regimes:
            options["regimes"] = tuple(self.regimes)
        for name, values in (self.grid or {}).items():
            if values:
                options[name] = tuple(values)
        if self.max_rows is not None:
            options["max_rows"] = self.max_rows or None
        if self.optimizer:
            options["optimizer"] = self.optimizer
        return replace(config, **options)

    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        suffix = "-quick" if self.quick else ""
        return Path("results") / f"study-{Path(self.data).resolve().name}{suffix}"


def run_overhead(
    data: str | Path,
    out: Path,
    config: StudyConfig,
    device: str,
    widths: tuple[int, int] | None = None,
) -> dict:
    """Time MLET against full tables at `widths` or the widths the study picked."""
    dim, equal_dim = widths or overhead_widths(out)
    hidden = tuple(k for k in StudyConfig().mlet_hidden if k >= dim)
    if not hidden:
        raise ValueError(
            f"no inner width k >= d={dim} among {StudyConfig().mlet_hidden} to time MLET with"
        )
    overhead = OverheadConfig(
        dim=dim, hidden=hidden, equal_accuracy_dim=equal_dim, device=device, threads=config.threads
    )
    result = measure_overhead(open_study_data(data, config.max_rows), overhead)
    write_json(out / "overhead.json", result)
    print(overhead_table(result))
    return result


def run_study_command(command: StudyCommand) -> Path:
    """Run the requested stages; returns the report's path (or the folder, for `grid`)."""
    if command.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {command.stage!r}")
    config = command.study_config()
    out = command.out_path()
    if command.stage in ("all", "grid"):
        run_study(command.data, out, config)
    if command.stage == "grid":
        return out
    if command.stage == "overhead" or (
        command.stage == "all" and not (out / "overhead.json").is_file()
    ):
        run_overhead(command.data, out, config, command.device, command.overhead_widths)
    if not load_cells(out):  # an overhead measurement alone, e.g. on a GPU machine
        return out / "overhead.json"
    return write_report(out, command.title)
