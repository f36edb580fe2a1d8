"""`mlet bench run`: every measurement of every model in one run, then the report.

Models are compared side by side on one machine in one run: in-process micro-benchmarks,
then the load sweep, each repeated and interleaved; the results folder records the
machine, the software, the commit and the command, so a reader can rerun it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.environment import environment
from bench.inprocess.micro import MicroConfig, Target, run_micro
from bench.load.sweep import SweepConfig, run_sweep
from bench.report.report import build_report
from bench.stats import unmeasured_as_null
from mlet.files import read_json, write_json
from mlet.repository import require_models
from mlet.selection import best_per_width


@dataclass
class CompareConfig:
    micro: MicroConfig = field(default_factory=MicroConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    roles: dict[str, str] = field(default_factory=dict)  # model -> role ("baseline", ...)
    torch_runs: tuple[tuple[str, Path], ...] = ()  # uncompressed runs for the micro-benchmark
    study: Path | None = None  # a `mlet study` folder whose curves join the accuracy plot


def default_results_folder() -> Path:
    return Path("results") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def run_comparison(
    repo: str | Path, models: list[str], config: CompareConfig, out: str | Path
) -> Path:
    """Measure, store the raw figures, write the report; returns the HTML report's path."""
    repo, out = Path(repo), Path(out)
    require_models(repo, models)
    out.mkdir(parents=True, exist_ok=True)
    roles = dict(config.roles)
    if "baseline" not in roles.values():
        roles[models[0]] = "baseline"
    settings = {
        "repo": str(repo.resolve()),
        "models": models,
        "roles": roles,
        "micro": asdict(config.micro),
        "sweep": asdict(config.sweep),
        "reference_users": config.sweep.reference_users,
        "torch_runs": [[n, str(p)] for n, p in config.torch_runs],
    }
    write_json(out / "environment.json", environment(settings))
    targets = [Target(m, repo / m) for m in models]
    targets += [Target(name, Path(path), "pytorch") for name, path in config.torch_runs]
    if config.study is not None:
        write_json(out / "study.json", study_lines(config.study))
    write_json(out / "micro.json", run_micro(targets, config.micro))
    sweep = run_sweep(repo, models, config.sweep, out / "locust")
    write_json(out / "sweep.json", unmeasured_as_null(sweep))
    _, html_path = build_report(out)
    return html_path


def study_lines(study_folder: str | Path, regime: str = "one-pass") -> list[dict]:
    """Accuracy-against-bytes lines of a `mlet study` folder, one per method, for the report.

    Multi-layer rows keep, per width, the inner width with the best validation AUC, as
    the study itself does.
    """
    path = Path(study_folder) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{study_folder} is not a study folder (no summary.json)")
    groups = [g for g in read_json(path)["groups"] if g["regime"] == regime]
    if not groups:
        raise ValueError(f"{study_folder} has no results for regime {regime!r}")
    lines = []
    for method in ("full", "mlet", "svd"):
        chosen = list(best_per_width(groups, method).values())
        if not chosen:
            continue
        lines.append(
            {
                "label": f"{method} ({regime})",
                "dims": [g["dim"] for g in chosen],
                "bytes": [g["embedding_bytes"] for g in chosen],
                "auc_mean": [g["test_auc"] for g in chosen],
                "auc_std": [g["test_auc_std"] for g in chosen],
                "source": str(Path(study_folder).resolve()),
            }
        )
    return lines
