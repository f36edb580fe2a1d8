"""Reading a study folder: means over seeds, the width-limited check, reduction factors,
frequency buckets, table spectra, plots and a Markdown report.

The decision rule (per regime): the best full width is the one with the highest mean test
AUC; a width "matches" it when its mean test AUC is within the tolerance max(std of the
best full width over seeds, 0.001). The data is width-limited when the best full width
beats the smallest full width by more than max(sum of their stds, 0.001). The reduction
factor is (smallest full width that matches) / (smallest MLET width that matches, its k
chosen by validation AUC); it is quoted only on width-limited data.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mlet.files import read_json, write_json
from mlet.markdown import markdown_table
from mlet.selection import best_per_width
from study.grid import REGIMES, load_cells
from study.table_analysis import FREQUENCY_BUCKETS

TOLERANCE_FLOOR = 0.001
MLET_COLOURS = defaultdict(
    lambda: "tab:olive",
    {16: "tab:blue", 32: "tab:orange", 64: "tab:green", 128: "tab:purple"},
)
METHOD_LABELS = {
    "full": "full (paper init)",
    "full-normal": "full, tables N(0, std^2)",
    "svd": "SVD of widest full, no fine-tuning",
    "mlet": "MLET",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def group_key(cell: dict) -> tuple:
    return (cell["regime"], cell["method"], cell["dim"], cell["hidden"])


def chosen_records(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records of each group at its chosen rate (the one-pass rate, or the sweep's best)."""
    by_group: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_group[group_key(record["cell"])][record["cell"]["lr"]].append(record)
    chosen = {}
    for key, by_lr in by_group.items():
        first_seed = min(r["cell"]["seed"] for runs in by_lr.values() for r in runs)

        def score(lr: float, runs=by_lr, seed=first_seed) -> tuple:
            firsts = [r for r in runs[lr] if r["cell"]["seed"] == seed]
            return (firsts[0]["metrics"]["val"]["auc"] if firsts else -1.0, -lr)

        lr = max(by_lr, key=score)
        chosen[key] = sorted(by_lr[lr], key=lambda r: r["cell"]["seed"])
    return chosen


def summarise_group(key: tuple, runs: list[dict]) -> dict:
    regime, method, dim, hidden = key
    test_mean, test_std = _mean_std([r["metrics"]["test"]["auc"] for r in runs])
    val_mean, _ = _mean_std([r["metrics"]["val"]["auc"] for r in runs])
    buckets = {}
    for name in FREQUENCY_BUCKETS:
        values = [r["bucket_auc"][name]["auc"] for r in runs if r["bucket_auc"][name]["auc"]]
        mean, std = _mean_std(values) if values else (None, None)
        buckets[name] = {"mean": mean, "std": std, "rows": runs[0]["bucket_auc"][name]["rows"]}
    return {
        "regime": regime,
        "method": method,
        "dim": dim,
        "hidden": hidden,
        "lr": runs[0]["cell"]["lr"],
        "seeds": [r["cell"]["seed"] for r in runs],
        "best_epochs": [r["metrics"]["best_epoch"] for r in runs],
        "epochs_run": [r["metrics"]["epochs_run"] for r in runs],
        "test_auc": test_mean,
        "test_auc_std": test_std,
        "val_auc": val_mean,
        "embedding_bytes": runs[0]["embedding_bytes"],
        "bucket_auc": buckets,
        "effective_rank": [
            _mean_std([r["spectra"][t]["effective_rank"] for r in runs])[0]
            for t in range(len(runs[0]["spectra"]))
        ],
        "spectrum_seed0": [t["singular_values"] for t in runs[0]["spectra"]],
        "train_seconds": _mean_std([r["metrics"].get("train_seconds", 0.0) for r in runs])[0],
    }


def summarise(records: list[dict]) -> list[dict]:
    groups = [summarise_group(k, runs) for k, runs in chosen_records(records).items()]
    order = {m: i for i, m in enumerate(("full", "mlet", "svd", "full-normal"))}
    return sorted(
        groups,
        key=lambda g: (REGIMES.index(g["regime"]), order[g["method"]], g["dim"], g["hidden"] or 0),
    )


def best_mlet_per_dim(groups: list[dict]) -> dict[int, dict]:
    """For each MLET width, the k with the best mean validation AUC."""
    return best_per_width(groups, "mlet")


def verdict(groups: list[dict], largest_table: int = 0) -> dict | None:
    """The width-limited check and the reduction factor of one regime's groups."""
    full = sorted((g for g in groups if g["method"] == "full"), key=lambda g: g["dim"])
    if not full:
        return None
    best = max(full, key=lambda g: g["test_auc"])
    smallest = full[0]
    tolerance = max(best["test_auc_std"], TOLERANCE_FLOOR)
    threshold = best["test_auc"] - tolerance
    limit_gap = best["test_auc"] - smallest["test_auc"]
    limit_noise = max(best["test_auc_std"] + smallest["test_auc_std"], TOLERANCE_FLOOR)
    width_limited = best is not smallest and limit_gap > limit_noise
    equal_full = next(g for g in full if g["test_auc"] >= threshold)
    mlet = best_mlet_per_dim(groups)
    matching = [g for g in mlet.values() if g["test_auc"] >= threshold]
    svd = [g for g in groups if g["method"] == "svd" and g["test_auc"] >= threshold]
    best_mlet = max(mlet.values(), key=lambda g: g["test_auc"]) if mlet else None
    result = {
        "best_full": _brief(best),
        "smallest_full": _brief(smallest),
        "tolerance": tolerance,
        "width_limited": width_limited,
        "width_gap": limit_gap,
        "width_noise": limit_noise,
        "equal_full": _brief(equal_full),
        "smallest_matching_mlet": _brief(min(matching, key=lambda g: g["dim"]))
        if matching
        else None,
        "smallest_matching_svd": _brief(min(svd, key=lambda g: g["dim"])) if svd else None,
        "best_mlet": _brief(best_mlet) if best_mlet else None,
        "reduction": None,
    }
    if width_limited and matching:
        d = min(g["dim"] for g in matching)
        result["reduction"] = equal_full["dim"] / d
    compressed = list(mlet.values()) + [g for g in groups if g["method"] == "svd"]
    result["equivalents"] = [equivalent_full(g, full) for g in compressed]
    return result


def equivalent_full(g: dict, full: list[dict]) -> dict:
    """The widest full width that `g` is as accurate as (within that width's tolerance)."""
    matched = [
        f for f in full if g["test_auc"] >= f["test_auc"] - max(f["test_auc_std"], TOLERANCE_FLOOR)
    ]
    widest = max(matched, key=lambda f: f["dim"]) if matched else None
    return {
        **_brief(g),
        "full_dim": widest["dim"] if widest else None,
        "full_test_auc": widest["test_auc"] if widest else None,
        "width_ratio": widest["dim"] / g["dim"] if widest else None,
    }


def equivalents_table(v: dict | None) -> str:
    if not v:
        return ""
    header = ["method", "d", "k", "test AUC", "widest full width it matches", "full AUC",
              "width ratio"]  # fmt: skip
    rows = []
    for e in v["equivalents"]:
        full = (
            [str(e["full_dim"]), f"{e['full_test_auc']:.4f}", f"{e['width_ratio']:g}x"]
            if e["full_dim"]
            else ["none", "-", "-"]
        )
        rows.append(
            [e["method"], str(e["dim"]), str(e["hidden"] or "-"),
             f"{e['test_auc']:.4f} ± {e['test_auc_std']:.4f}", *full]
        )  # fmt: skip
    return markdown_table(header, rows, "lrrlrrr") + "\n"


def _brief(g: dict) -> dict:
    keys = ("method", "dim", "hidden", "lr", "test_auc", "test_auc_std", "embedding_bytes")
    return {k: g[k] for k in keys}


def describe_verdict(regime: str, v: dict | None) -> str:
    if v is None:
        return f"- **{regime}**: no full-table cells, no verdict.\n"
    best, small = v["best_full"], v["smallest_full"]
    lines = [
        f"- **{regime}**: best full width d={best['dim']} (test AUC {best['test_auc']:.4f} ± "
        f"{best['test_auc_std']:.4f}); smallest full width d={small['dim']} "
        f"{small['test_auc']:.4f} ± {small['test_auc_std']:.4f}. Gap {v['width_gap']:+.4f} "
        f"against noise {v['width_noise']:.4f}: "
        + ("**width-limited**." if v["width_limited"] else "**not width-limited**.")
    ]
    eq, m = v["equal_full"], v["smallest_matching_mlet"]
    lines.append(f"  Tolerance {v['tolerance']:.4f}; smallest full width within it: d={eq['dim']}.")
    if m:
        lines.append(
            f"  Smallest MLET width within it: d={m['dim']} (k={m['hidden']}, "
            f"{m['test_auc']:.4f} ± {m['test_auc_std']:.4f})."
        )
    else:
        best_mlet = v["best_mlet"]
        extra = (
            f" (best MLET: d={best_mlet['dim']} k={best_mlet['hidden']}, "
            f"{best_mlet['test_auc']:.4f})"
            if best_mlet
            else ""
        )
        lines.append(f"  No MLET width is within it{extra}.")
    s = v["smallest_matching_svd"]
    lines.append(
        f"  Smallest SVD width within it: d={s['dim']}." if s else "  No SVD width is within it."
    )
    if v["reduction"]:
        lines.append(
            f"  **Reduction: {v['reduction']:g}x** inference bytes (full d={eq['dim']} -> "
            f"MLET d={m['dim']})."
        )
    elif not v["width_limited"]:
        lines.append("  No reduction factor: the data is not limited by width in this regime.")
    else:
        lines.append("  No reduction factor: no MLET width reaches the best full width.")
    return "\n".join(lines) + "\n"


def results_table(groups: list[dict]) -> str:
    header = ["method", "d", "k", "lr", "best epoch per seed", "test AUC (mean ± std)",
              "emb. bytes"]  # fmt: skip
    rows = [
        [g["method"], str(g["dim"]), str(g["hidden"] or "-"), f"{g['lr']:g}",
         ",".join(str(e) for e in g["best_epochs"]),
         f"{g['test_auc']:.4f} ± {g['test_auc_std']:.4f}", f"{g['embedding_bytes']:,}"]
        for g in groups
    ]  # fmt: skip
    return markdown_table(header, rows, "lrrrllr") + "\n"


def bucket_table(groups: list[dict], v: dict | None) -> str:
    """Per-bucket test AUC of full, MLET (best k) and SVD at each MLET width, and of full at
    the best width."""
    if not v:
        return ""
    mlet = best_mlet_per_dim(groups)
    index = {(g["method"], g["dim"]): g for g in groups if g["method"] != "mlet"}
    picked = [index.get(("full", v["best_full"]["dim"]))]
    for d, m in mlet.items():
        picked += [index.get(("full", d)), m, index.get(("svd", d))]
    rows = [g for g in picked if g]
    first = rows[0]["bucket_auc"]
    buckets = [f"{b} ({first[b]['rows']:,} rows)" for b in FREQUENCY_BUCKETS]
    cells = []
    for g in rows:
        row = [g["method"], str(g["dim"]), str(g["hidden"] or "-")]
        for b in FREQUENCY_BUCKETS:
            mean, std = g["bucket_auc"][b]["mean"], g["bucket_auc"][b]["std"]
            row.append(f"{mean:.4f} ± {std:.4f}" if mean is not None else "-")
        cells.append(row)
    return markdown_table(["method", "d", "k", *buckets], cells, "lrrlll") + "\n"


def rank_table(groups: list[dict], table: int) -> str:
    mlet = best_mlet_per_dim(groups)
    full = {g["dim"]: g for g in groups if g["method"] == "full"}
    rows = []
    for d, m in mlet.items():
        f = full.get(d)
        f_rank = f"{f['effective_rank'][table]:.2f}" if f else "-"
        rows.append([str(d), f_rank, f"{m['effective_rank'][table]:.2f} (k={m['hidden']})"])
    header = ["d", "full: effective rank", "MLET (k): effective rank"]
    return markdown_table(header, rows, "rrl") + "\n"


def plot_accuracy(groups: list[dict], regime: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=90)
    lines: dict[str, list[dict]] = defaultdict(list)
    for g in groups:
        label = METHOD_LABELS[g["method"]]
        if g["method"] == "mlet":
            label = f"MLET k={g['hidden']}"
        lines[label].append(g)
    styles = {"full (paper init)": dict(color="black", linewidth=2.2, marker="o")}
    for label, points in lines.items():
        points = sorted(points, key=lambda g: g["embedding_bytes"])
        style = styles.get(label, dict(marker="s"))
        if label.startswith("MLET"):
            style = dict(marker="s", color=MLET_COLOURS[points[0]["hidden"]])
        if label.startswith("full, tables"):
            style = dict(color="grey", linestyle="--", marker="v")
        if label.startswith("SVD"):
            style = dict(color="tab:red", linestyle=":", marker="D")
        ax.errorbar(
            [g["embedding_bytes"] for g in points],
            [g["test_auc"] for g in points],
            yerr=[g["test_auc_std"] for g in points],
            label=label,
            capsize=3,
            markersize=4,
            **style,
        )
        if label == "full (paper init)":
            for g in points:
                ax.annotate(
                    f"d={g['dim']}",
                    (g["embedding_bytes"], g["test_auc"]),
                    textcoords="offset points",
                    xytext=(0, 6),
                    fontsize=7,
                    ha="center",
                )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding bytes at inference (float32)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"{title}: {regime}", fontsize=10)
    # Scale to the main methods; a badly initialised contrast can sit far below them.
    main = [g for g in groups if g["method"] in ("full", "mlet", "svd")]
    low = min(g["test_auc"] - g["test_auc_std"] for g in main) - 0.003
    high = max(g["test_auc"] + g["test_auc_std"] for g in main) + 0.003
    hidden = [g for g in groups if g["test_auc"] < low]
    if hidden:
        worst = ", ".join(f"d={g['dim']} {g['test_auc']:.3f}" for g in hidden)
        ax.text(0.01, 0.01, f"below the axis: {worst}", transform=ax.transAxes, fontsize=7)
    ax.set_ylim(low, high)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ranks(summary: list[dict], table: int, table_name: str, title: str, path: Path) -> None:
    """Normalised spectra (widest common width, tuned or one-pass) and effective rank by d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=90)
    colours = {"one-pass": "tab:blue", "tuned": "tab:orange"}
    for regime in REGIMES:
        groups = [g for g in summary if g["regime"] == regime]
        mlet = best_mlet_per_dim(groups)
        full = {g["dim"]: g for g in groups if g["method"] == "full"}
        common = [d for d in mlet if d in full]
        if not common:
            continue
        d = max(common)
        for g, style in ((full[d], "-"), (mlet[d], "--")):
            values = np.asarray(g["spectrum_seed0"][table])
            name = "full" if g["method"] == "full" else f"MLET k={g['hidden']}"
            left.plot(
                np.arange(1, len(values) + 1),
                values / values.sum(),
                style,
                color=colours[regime],
                marker="o",
                markersize=3,
                label=f"{regime}: {name} d={d}",
            )
        for cells, style, name in ((full, "-o", "full"), (mlet, "--s", "MLET (best k)")):
            ranks = [cells[c]["effective_rank"][table] for c in common]
            right.plot(common, ranks, style, color=colours[regime], label=f"{regime}: {name}")
    if right.lines:
        top = max(max(line.get_xdata()) for line in right.lines)
        right.plot([1, top], [1, top], ":", color="grey", label="rank = d")
    left.set_xlabel("singular value index")
    left.set_ylabel("singular value / sum")
    left.set_title(f"spectrum of table {table_name} (seed 0)", fontsize=9)
    right.set_xscale("log", base=2)
    right.set_xlabel("width d")
    right.set_ylabel("effective rank (exp entropy)")
    right.set_title(f"effective rank of table {table_name} (mean over seeds)", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: str | Path, title: str | None = None) -> Path:
    """summary.json, the plots and report.md of a study folder; returns report.md's path."""
    out = Path(out)
    study = read_json(out / "study.json")
    records = load_cells(out)
    if not records:
        raise FileNotFoundError(f"{out} holds no finished cells yet")
    summary = summarise(records)
    schema = read_json(Path(study["data"]) / "schema.json")
    sizes = schema["table_sizes"]
    table = int(np.argmax(sizes))
    table_name = schema.get("table_names", [f"C{i + 1}" for i in range(len(sizes))])[table]
    title = title or out.name
    verdicts, sections = {}, [f"# Study {title}\n", _setup(study, schema, records)]
    for regime in REGIMES:
        groups = [g for g in summary if g["regime"] == regime]
        if not groups:
            continue
        plot = out / f"auc-vs-bytes-{regime}.png"
        plot_accuracy(groups, regime, title, plot)
        verdicts[regime] = v = verdict(groups)
        sections += [
            f"\n## {regime}\n",
            describe_verdict(regime, v),
            "\nEach MLET width (k chosen by validation AUC) and SVD width against the widest full "
            "width it is as accurate as (its mean test AUC at least that width's mean minus "
            "max(std, 0.001)):\n",
            equivalents_table(v),
            f"\n![accuracy against bytes, {regime}]({plot.name})\n",
            results_table(groups),
            f"\nTest AUC by frequency of the row's id in table {table_name} (the largest; "
            "buckets are thirds of the test rows by the id's training count):\n",
            bucket_table(groups, v),
            f"\nEffective rank of table {table_name} (exp of the entropy of its normalised "
            "singular values; at most d):\n",
            rank_table(groups, table),
        ]
    plot_ranks(summary, table, table_name, title, out / "rank.png")
    sections.append("\n## Spectra\n\n![spectra and effective rank](rank.png)\n")
    if (out / "overhead.json").is_file():
        from study.overhead import overhead_table

        sections += ["\n## Training overhead\n\n", overhead_table(read_json(out / "overhead.json"))]
    write_json(out / "summary.json", {"groups": summary, "verdicts": verdicts})
    report = out / "report.md"
    tmp = report.with_name(".report.md.tmp")
    tmp.write_text("\n".join(sections))
    tmp.replace(report)
    return report


def _setup(study: dict, schema: dict, records: list[dict]) -> str:
    settings, grid = study["settings"], study["grid"]
    counts = defaultdict(int)
    for r in records:
        counts[r["cell"]["regime"]] += 1
    seconds = sum(r.get("wall_seconds", 0.0) for r in records)
    rows = schema.get("rows", 0)
    used = min(settings["max_rows"] or rows, rows)
    return (
        f"Data: `{study['data']}` ({rows:,} rows, the study uses the first {used:,}; "
        f"{len(schema['table_sizes'])} tables, "
        f"{sum(schema['table_sizes']):,} ids). Optimizer {settings['optimizer']}, batch "
        f"{settings['batch_size']}. One pass: 1 epoch at lr {settings['one_pass_lr']}. Tuned: "
        f"lr sweep {settings['lrs']} on the first seed, up to {settings['max_epochs']} epochs, "
        f"patience {settings['patience']}, best epoch restored. Grid: {grid}. Cells finished: "
        f"{dict(counts)}, {seconds / 60:.0f} min of training in all (summed over cells).\n"
    )


def overhead_widths(out: str | Path, default_dim: int = 4) -> tuple[int, int | None]:
    """(MLET width to time, the full width of equal accuracy) from a study's verdicts.

    Takes the smallest MLET width that matches the best full width and the smallest full
    width that does (tuned regime first); else `default_dim` and the widest full width MLET
    at that width is as accurate as; else no equal-accuracy width.
    """
    summary = summarise(load_cells(out))
    for regime in ("tuned", "one-pass"):
        v = verdict([g for g in summary if g["regime"] == regime])
        if v and v["smallest_matching_mlet"]:
            return v["smallest_matching_mlet"]["dim"], v["equal_full"]["dim"]
    for regime in ("tuned", "one-pass"):
        v = verdict([g for g in summary if g["regime"] == regime])
        for e in v["equivalents"] if v else []:
            if e["method"] == "mlet" and e["dim"] == default_dim and e["full_dim"]:
                return default_dim, e["full_dim"]
    return default_dim, None
