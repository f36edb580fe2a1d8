"""The report of `mlet bench scale`: its table, its goals as ratios of one run, two plots."""

from __future__ import annotations

import html

from bench.report.report import STYLE, html_table, png_bytes, pyplot
from mlet.markdown import markdown_table

BASELINE, COMPRESSED = "full-d64", "mlet-d16-k64"


def find(rows: list[dict], **keys) -> dict | None:
    found = [r for r in rows if all(r[k] == v for k, v in keys.items())]
    return found[0] if found else None


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return a[key] / b[key] if a is not None and b is not None and b[key] else None


def scale_goals(rows: list[dict], details: dict) -> list[dict]:
    """The issue's goals, each a ratio of figures measured in this run (None: not run)."""
    goals = []

    def goal(text: str, value: float | None, limit: float) -> None:
        goals.append(
            {
                "goal": text,
                "value": value,
                "limit": limit,
                "met": None if value is None else value <= limit,
            }
        )

    for engine in sorted({r["engine"] for r in rows}):
        small = find(rows, engine=engine, variant=COMPRESSED)
        large = find(rows, engine=engine, variant=BASELINE)
        goal(
            f"{engine}: model resident bytes, {COMPRESSED} / {BASELINE}",
            ratio(small, large, "model_resident_bytes"),
            0.26,
        )
        goal(
            f"{engine}: RSS after warm-up, {COMPRESSED} / {BASELINE}",
            ratio(small, large, "rss_bytes"),
            0.3,
        )
        for count in sorted({r["rows_per_request"] for r in rows}):
            keys = {"engine": engine, "ids": "zipf", "rows_per_request": count}
            goal(
                f"{engine}: Zipf {count}-row p99, {COMPRESSED} / {BASELINE}",
                ratio(
                    find(rows, variant=COMPRESSED, **keys),
                    find(rows, variant=BASELINE, **keys),
                    "p99_ms",
                ),
                1.0,
            )
    fp16 = find(rows, variant=f"{COMPRESSED}-fp16")
    for variant, limit in (("int8", 0.65), ("int4", 0.4)):
        goal(
            f"bytes on disk, {COMPRESSED}-{variant} / {COMPRESSED}-fp16",
            ratio(find(rows, variant=f"{COMPRESSED}-{variant}"), fp16, "disk_bytes"),
            limit,
        )
    for served in details["served"]:
        row = find(rows, engine=served["engine"], variant=served["variant"])
        if row is not None and served["read_s"] > 0:
            goal(
                f"{served['engine']}: {served['variant']} ready / one read of its files",
                row["ready_s"] / served["read_s"],
                2.0,
            )
    return goals


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def result_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "engine",
        "variant",
        "ids",
        "rows/req",
        "disk MiB",
        "ready s",
        "RSS MiB",
        "peak RSS MiB",
        "model resident MiB",
        "requests/s",
        "rows/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
    ]
    body = [
        [
            r["engine"],
            r["variant"],
            r["ids"],
            str(r["rows_per_request"]),
            cell(r["disk_bytes"] / 2**20, 0),
            cell(r["ready_s"], 1),
            cell(r["rss_bytes"] / 2**20, 0),
            cell(r["peak_rss_bytes"] / 2**20, 0),
            cell(r["model_resident_bytes"] / 2**20, 0),
            cell(r["requests_per_s"], 0),
            cell(r["rows_per_s"], 0),
            cell(r["p50_ms"]),
            cell(r["p99_ms"]),
            cell(r["p999_ms"]),
        ]
        for r in rows
    ]
    return header, body


def goal_rows(goals: list[dict]) -> tuple[list[str], list[list[str]]]:
    verdict = {True: "met", False: "missed", None: "not measured"}
    return ["goal", "ratio", "at most", ""], [
        [g["goal"], cell(g["value"], 3), f"{g['limit']:g}", verdict[g["met"]]] for g in goals
    ]


def build_rows(details: dict) -> tuple[list[str], list[list[str]]]:
    header = [
        "run",
        "models",
        "weights",
        "steps",
        "test AUC",
        "train s",
        "export s",
        "export peak RSS MiB",
    ]
    body = []
    for run, build in details["builds"].items():
        if build["reused"]:
            body.append(
                [
                    run,
                    ", ".join(build["models"]),
                    "reused from an earlier run",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                ]
            )
            continue
        body.append(
            [
                run,
                ", ".join(build["models"]),
                build["weights"],
                str(build["steps"]),
                cell(build["test_auc"], 4),
                cell(build["train_seconds"], 0),
                cell(build["export_seconds"], 0),
                cell(build["export_peak_rss_bytes"] / 2**20, 0),
            ]
        )
    return header, body


def cold_rows(details: dict) -> tuple[list[str], list[list[str]]]:
    header = [
        "engine",
        "variant",
        "read files s",
        "first answer s",
        "warm-up s",
        "client CPU cores (mean over loads)",
    ]
    body = []
    for served in details["served"]:
        loads = served["loads"]
        seconds = details["config"]["seconds"]
        client = sum(x["client_cpu_s"] for x in loads) / (seconds * len(loads)) if loads else None
        body.append(
            [
                served["engine"],
                served["variant"],
                cell(served["read_s"], 1),
                cell(served["first_answer_s"], 1),
                cell(served["warmup_s"], 1),
                cell(client),
            ]
        )
    return header, body


def panels(counts: list[int]):
    """pyplot and a figure with one panel per request size."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.2), squeeze=False)
    return plt, fig, axes[0]


def plot_memory_p99(rows: list[dict], ids: str, counts: list[int]) -> bytes:
    """Each variant's model files resident against its p99, per engine."""
    plt, fig, axes = panels(counts)
    for ax, count in zip(axes, counts, strict=True):
        for engine, marker in zip(sorted({r["engine"] for r in rows}), "os^", strict=False):
            points = [
                r
                for r in rows
                if r["engine"] == engine and r["ids"] == ids and r["rows_per_request"] == count
            ]
            xs = [r["model_resident_bytes"] / 2**30 for r in points]
            ys = [r["p99_ms"] for r in points]
            ax.scatter(xs, ys, marker=marker, label=engine)
            for r, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(
                    r["variant"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.set(
            xlabel="model files resident after warm-up (GiB)",
            ylabel="p99 (ms)",
            title=f"{ids} ids, {count}-row requests",
        )
        ax.legend()
    return png_bytes(fig, plt)


def plot_throughput(rows: list[dict], ids: str, counts: list[int]) -> bytes:
    """Requests/s (1 row) or rows/s per variant, one bar per engine."""
    engines = sorted({r["engine"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    plt, fig, axes = panels(counts)
    width = 0.8 / len(engines)
    for ax, count in zip(axes, counts, strict=True):
        key = "requests_per_s" if count == 1 else "rows_per_s"
        for index, engine in enumerate(engines):
            values = []
            for variant in variants:
                row = find(rows, engine=engine, variant=variant, ids=ids, rows_per_request=count)
                values.append(row[key] if row else 0.0)
            positions = [i + index * width for i in range(len(variants))]
            ax.bar(positions, values, width, label=engine)
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(variants))])
        ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=key.replace("_per_s", "/s"), title=f"{ids} ids, {count}-row requests")
        ax.legend()
    return png_bytes(fig, plt)


def scale_plots(rows: list[dict]) -> dict[str, bytes]:
    """Memory against p99, and throughput, for Zipf ids where the run has them."""
    counts = sorted({r["rows_per_request"] for r in rows})
    ids = "zipf" if any(r["ids"] == "zipf" for r in rows) else rows[0]["ids"]
    return {
        "memory_p99": plot_memory_p99(rows, ids, counts),
        "throughput": plot_throughput(rows, ids, counts),
    }


def tables(rows: list[dict], details: dict) -> dict:
    return {
        "Results": result_rows(rows),
        "Goals, ratios of this run": goal_rows(scale_goals(rows, details)),
        "Models and their weights": build_rows(details),
        "Cold start and warm-up": cold_rows(details),
    }


def context_lines(details: dict) -> list[str]:
    zipf = details["zipf"]
    fitted = (
        f", fitted on table {zipf['table']} of {zipf['dataset']}"
        if zipf["source"] == "fitted"
        else f" ({zipf['source']})"
    )
    config, env = details["config"], details["environment"]
    machine, sizes = env["machine"], config["table_sizes"]
    return [
        f"Tables: {len(sizes)}, {sum(sizes):,} rows"
        + (
            " (--quick: Criteo Kaggle's sizes divided by 100)"
            if config["quick"]
            else " (Criteo Kaggle's sizes)"
        ),
        f"Zipf exponent {zipf['exponent']:.3f}{fitted}.",
        *(f"Ids '{kind}': {note}." for kind, note in details["ids"].items()),
        f"Load: wrk, {config['connections']} connections, {config['seconds']} s per load, "
        f"HTTP binary tensors, {config['pool']} distinct bodies per load (the same for every "
        "engine and model). One server at a time, one model each.",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
        f"{machine['memory_bytes'] / 2**30:.1f} GiB. Commit {env['git_commit']}. "
        f"Whole run {details['seconds'] / 60:.0f} min.",
    ]


def scale_markdown(rows: list[dict], details: dict, plots: dict) -> str:
    lines = ["# Serving at scale: compressed against uncompressed", ""]
    lines += [f"- {line}" for line in context_lines(details)] + [""]
    for title, table in tables(rows, details).items():
        lines += [f"## {title}", "", markdown_table(*table), ""]
    lines += [f"![{name}](plots/scale-{name}.png)" for name in plots] + [""]
    return "\n".join(lines)


def scale_html(rows: list[dict], details: dict, plots: dict) -> str:
    import base64

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>Serving at scale</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Serving at scale: compressed against uncompressed</h1>",
        '<div class="summary">'
        + "".join(f"<p>{html.escape(x)}</p>" for x in context_lines(details))
        + "</div>",
    ]
    for title, table in tables(rows, details).items():
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(*table)]
    parts.append('<div class="plots">')
    for name, png in plots.items():
        data = base64.b64encode(png).decode()
        parts.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
    parts += ["</div></body></html>"]
    return "\n".join(parts)
