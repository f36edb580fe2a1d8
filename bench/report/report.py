"""`mlet bench report`: report.md and a self-contained report.html from a results folder.

The first screen answers what a deployer asks: how much smaller, how much less memory,
how much faster or slower, at what accuracy cost, each against the baseline and measured
side by side in one run. Plots are PNGs, inlined in the HTML as data URIs.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from mlet.files import read_json
from mlet.markdown import markdown_table

MIB = 2**20
NOISE_NOTE = "Figures are medians over repetitions; '(noisy)' marks a spread above 10%."
HEADLINE_NOTE = (
    "Ratios are against the baseline: 'smaller' and 'less memory' above 1 and throughput "
    "ratios above 1 favour the model, a p99 ratio below 1 favours it. Model memory is the "
    "resident memory an in-process ONNX Runtime session adds, after warm-up on skewed ids; "
    "server RSS is the whole serving process after the load sweep."
)


@dataclass
class Results:
    folder: Path
    environment: dict
    micro: list[dict]
    sweep: list[dict]
    study: list[dict]

    @property
    def roles(self) -> dict[str, str]:
        """Model name -> its role in the comparison (baseline, compressed, same width)."""
        return self.environment["config"].get("roles", {})

    @property
    def baseline(self) -> str:
        named = [m for m, role in self.roles.items() if role == "baseline"]
        return named[0] if named else self.sweep[0]["model"]


def load_results(folder: str | Path) -> Results:
    folder = Path(folder)
    if not (folder / "environment.json").is_file():
        raise FileNotFoundError(f"{folder} is not a benchmark results folder (no environment.json)")

    def optional(name: str) -> list:
        return read_json(folder / name) if (folder / name).is_file() else []

    return Results(
        folder=folder,
        environment=read_json(folder / "environment.json"),
        micro=optional("micro.json"),
        sweep=optional("sweep.json"),
        study=optional("study.json"),
    )


# -- the figures the headline compares ---------------------------------------------------


def step_at_users(curve: list[dict], users: int) -> dict:
    """The step with `users` users, or the nearest below it."""
    candidates = [s for s in curve if s["users"] <= users] or curve[:1]
    return candidates[-1]


def max_throughput(curve: list[dict], key: str) -> dict:
    return max((s[key] for s in curve), key=lambda f: f["median"])


def model_figures(results: Results, sweep: dict) -> dict:
    """The headline figures of one model, each a median with its spread where repeated."""
    config = results.environment["config"]
    kinds = list(sweep["curves"])
    small, large = sweep["curves"][kinds[0]], sweep["curves"][kinds[-1]]
    micro = next((m for m in results.micro if m["name"] == sweep["model"]), None)
    return {
        "model": sweep["model"],
        "role": results.roles.get(sweep["model"], ""),
        "embedding_bytes": sweep["embedding_bytes"],
        "model_bytes": sweep["model_bytes"],
        "server_rss": sweep["server_rss_bytes"],
        "inprocess_rss": micro["rss_after_warmup_bytes"] if micro else None,
        "model_memory": model_memory(micro) if micro else None,
        "p99_ms": step_at_users(small, config.get("reference_users", 16))["p99_ms"],
        "max_requests_per_s": max_throughput(small, "requests_per_s"),
        "max_rows_per_s": max_throughput(large, "rows_per_s"),
        "test_auc": sweep.get("test_auc"),
        "kinds": kinds,
    }


def model_memory(micro: dict) -> dict:
    """Memory the model itself holds: resident after warm-up less resident before loading."""
    from bench.stats import median_and_spread

    return median_and_spread(
        [r["after_warmup"]["rss_bytes"] - r["before_load"]["rss_bytes"] for r in micro["raw"]]
    )


def headline(results: Results) -> list[dict]:
    """Figures per model with ratios against the baseline (>1 means better than baseline)."""
    figures = [model_figures(results, s) for s in results.sweep]
    base = next(f for f in figures if f["model"] == results.baseline)
    for f in figures:
        f["bytes_reduction"] = base["embedding_bytes"] / f["embedding_bytes"]
        f["file_reduction"] = base["model_bytes"] / f["model_bytes"]
        memory = "model_memory" if f["model_memory"] and base["model_memory"] else "server_rss"
        f["memory_reduction"] = base[memory]["median"] / f[memory]["median"]
        f["p99_ratio"] = f["p99_ms"]["median"] / base["p99_ms"]["median"]
        f["throughput_ratio"] = (
            f["max_requests_per_s"]["median"] / base["max_requests_per_s"]["median"]
        )
        f["rows_ratio"] = f["max_rows_per_s"]["median"] / base["max_rows_per_s"]["median"]
        both = f["test_auc"] is not None and base["test_auc"] is not None
        f["auc_difference"] = f["test_auc"] - base["test_auc"] if both else None
    return figures


def summary_sentences(figures: list[dict], baseline: str) -> list[str]:
    lines = []
    for f in figures:
        if f["model"] == baseline:
            continue
        auc = "accuracy not recorded" if f["auc_difference"] is None else (
            f"test AUC {f['auc_difference']:+.4f}"
        )  # fmt: skip
        lines.append(
            f"{f['model']} against {baseline}: embeddings {f['bytes_reduction']:.1f}x smaller "
            f"(file {f['file_reduction']:.1f}x smaller), model memory "
            f"{f['memory_reduction']:.2f}x smaller, p99 latency {f['p99_ratio']:.2f}x the "
            f"baseline's, max throughput {f['throughput_ratio']:.2f}x (1-row requests) and "
            f"{f['rows_ratio']:.2f}x (batched), {auc}."
        )
    return lines


# -- formatting -----------------------------------------------------------------------------


def fmt(figure: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if figure is None:
        return "-"
    text = f"{figure['median'] / scale:,.{digits}f}"
    return text + (" (noisy)" if figure.get("noisy") else "")


def headline_rows(figures: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "model", "role", "embedding bytes", "smaller", "file bytes", "model memory MiB",
        "server RSS MiB", "less memory", "p99 ms (1 row)", "p99 ratio", "max req/s (1 row)",
        "ratio", "max rows/s (batched)", "ratio", "test AUC", "AUC diff",
    ]  # fmt: skip
    rows = []
    for f in figures:
        rows.append(
            [
                f["model"],
                f["role"],
                f"{f['embedding_bytes']:,}",
                f"{f['bytes_reduction']:.2f}x",
                f"{f['model_bytes']:,}",
                fmt(f["model_memory"], 1, MIB),
                fmt(f["server_rss"], 1, MIB),
                f"{f['memory_reduction']:.2f}x",
                fmt(f["p99_ms"]),
                f"{f['p99_ratio']:.2f}x",
                fmt(f["max_requests_per_s"], 0),
                f"{f['throughput_ratio']:.2f}x",
                fmt(f["max_rows_per_s"], 0),
                f"{f['rows_ratio']:.2f}x",
                "-" if f["test_auc"] is None else f"{f['test_auc']:.4f}",
                "-" if f["auc_difference"] is None else f"{f['auc_difference']:+.4f}",
            ]
        )
    return header, rows


def micro_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["model", "backend", "batch", "p50 ms", "p99 ms", "rows/s"]
    rows = []
    for m in results.micro:
        for t in m["timings"]:
            rows.append(
                [m["name"], m["backend"], str(t["batch"]), fmt(t["p50_ms"], 3), fmt(t["p99_ms"], 3),
                 fmt(t["rows_per_s"], 0)]
            )  # fmt: skip
    return header, rows


def memory_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["model", "backend", "file bytes", "RSS after load MiB", "RSS after warm-up MiB",
              "model file pages resident MiB"]  # fmt: skip
    rows = [
        [m["name"], m["backend"], f"{m['model_bytes']:,}", fmt(m["rss_after_load_bytes"], 1, MIB),
         fmt(m["rss_after_warmup_bytes"], 1, MIB), mapped_pages_cell(m)]
        for m in results.micro
    ]  # fmt: skip
    return header, rows


def mapped_pages_cell(model: dict) -> str:
    """Resident pages of memory-mapped weights; weights inside the .onnx are read, not mapped."""
    if model.get("mapped_model_files") == []:
        return "none mapped"
    return fmt(model["mapped_model_resident_bytes"], 2, MIB)


def sweep_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    header = ["model", "requests", "users", "req/s", "rows/s", "p50 ms", "p99 ms",
              "server queue ms", "server compute ms", "batch rows", "server CPU", "client CPU",
              "failures"]  # fmt: skip
    rows = []
    for s in results.sweep:
        for kind, curve in s["curves"].items():
            for step in curve:
                rows.append(
                    [s["model"], kind, str(step["users"]), fmt(step["requests_per_s"], 0),
                     fmt(step["rows_per_s"], 0), fmt(step["p50_ms"]), fmt(step["p99_ms"]),
                     fmt(step["server_queue_ms"], 2), fmt(step["server_compute_ms"], 2),
                     fmt(step["server_batch_rows"], 1), fmt(step["server_cpu_cores"], 2),
                     fmt(step["client_cpu_cores"], 2), str(step["failures"])]
                )  # fmt: skip
    return header, rows


BUSY = 0.85  # a side that kept this share of its cores busy counts as saturated


def limiting_side(step: dict, cores: int, locust_processes: int) -> str:
    """Which side the CPU figures of a load step say was the limit."""
    client, server = step["client_cpu_cores"]["median"], step["server_cpu_cores"]["median"]
    if client >= BUSY * locust_processes:
        return f"load generator ({client:.2f} of {locust_processes} Locust core(s))"
    if client + server >= BUSY * cores:
        return f"the machine's CPU (server {server:.2f} + client {client:.2f} of {cores} cores)"
    return f"neither side's CPU (server {server:.2f} + client {client:.2f} of {cores} cores)"


def saturation_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """At each model's highest throughput per request kind: what held it there."""
    header = ["model", "requests", "users", "rows/s", "limited by"]
    cores = results.environment["machine"]["logical_cores"]
    processes = results.environment["config"].get("sweep", {}).get("locust_processes", 1)
    rows = []
    for s in results.sweep:
        for kind, curve in s["curves"].items():
            step = max(curve, key=lambda x: x["rows_per_s"]["median"])
            rows.append(
                [s["model"], kind, str(step["users"]), fmt(step["rows_per_s"], 0),
                 limiting_side(step, cores, processes)]
            )  # fmt: skip
    return header, rows


def html_table(header: list[str], rows: list[list[str]], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    id_attr = f' id="{table_id}"' if table_id else ""
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -- plots ----------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_throughput(results: Results) -> bytes:
    plt = pyplot()
    kinds = list(results.sweep[0]["curves"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        key = "requests_per_s" if kind == kinds[0] else "rows_per_s"
        for s in results.sweep:
            curve = s["curves"][kind]
            x = [step[key]["median"] for step in curve]
            y = [step["p99_ms"]["median"] for step in curve]
            ax.plot(x, y, marker="o", label=s["model"])
            for step, xi, yi in zip(curve, x, y, strict=True):
                ax.annotate(str(step["users"]), (xi, yi), fontsize=7, alpha=0.6)
        ax.set_xlabel("requests/s" if key == "requests_per_s" else "rows/s")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{kind} requests (labels: users)")
        ax.grid(alpha=0.3)
        ax.legend()
    return png_bytes(fig, plt)


def plot_memory(results: Results, figures: list[dict]) -> bytes:
    plt = pyplot()
    names = [f["model"] for f in figures]
    series = {
        "embedding bytes (MiB)": [f["embedding_bytes"] / MIB for f in figures],
        "file bytes (MiB)": [f["model_bytes"] / MIB for f in figures],
        "server RSS (MiB)": [f["server_rss"]["median"] / MIB for f in figures],
    }
    if all(f["model_memory"] for f in figures):
        series["model memory (MiB)"] = [f["model_memory"]["median"] / MIB for f in figures]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, values, width=width, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))], names)
    ax.set_yscale("log")
    ax.set_ylabel("MiB (log)")
    ax.set_title("Bytes and memory per model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return png_bytes(fig, plt)


def plot_accuracy_bytes(results: Results, figures: list[dict]) -> bytes | None:
    """Benchmarked models (their own test AUC); beside them, the study's curves if given.

    The study trains its own cells (rows, epochs, seeds), so its AUCs sit on a scale of
    their own and get a panel of their own rather than sharing the models' axis.
    """
    points = [f for f in figures if f["test_auc"] is not None]
    if not points and not results.study:
        return None
    plt = pyplot()
    panels = 1 + bool(results.study)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for f in points:
        ax.scatter([f["embedding_bytes"]], [f["test_auc"]], s=60, zorder=3)
        ax.annotate(f["model"], (f["embedding_bytes"], f["test_auc"]), fontsize=8)
    ax.set_title("Benchmarked models")
    if results.study:
        study = axes[0][1]
        for line in results.study:
            study.errorbar(line["bytes"], line["auc_mean"], yerr=line["auc_std"], marker="o",
                           capsize=2, label=line["label"])  # fmt: skip
            for d, x, y in zip(line["dims"], line["bytes"], line["auc_mean"], strict=True):
                study.annotate(f"d={d}", (x, y), fontsize=6, alpha=0.7)
        study.set_title("Study (mean ± std over seeds)")
        study.legend(fontsize=7)
    for a in axes[0]:
        a.set_xscale("log")
        a.set_xlabel("inference embedding bytes (log)")
        a.set_ylabel("test AUC")
        a.grid(alpha=0.3)
    return png_bytes(fig, plt)


def plot_micro(results: Results) -> bytes | None:
    if not results.micro:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, m in enumerate(results.micro):
        batches = [t["batch"] for t in m["timings"]]
        color = f"C{i}"
        ax.plot(batches, [t["p50_ms"]["median"] for t in m["timings"]], marker="o",
                color=color, label=f"{m['name']} p50")  # fmt: skip
        ax.plot(batches, [t["p99_ms"]["median"] for t in m["timings"]], linestyle="--",
                color=color, label=f"{m['name']} p99")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("In-process latency per batch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig, plt)


def png_bytes(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# -- the documents --------------------------------------------------------------------------


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} .summary{font-size:1.05em;background:#f3f7fb;padding:12px 16px;
border-left:4px solid #3b7dd8} table{border-collapse:collapse;margin:12px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#eef2f6}
td:first-child,th:first-child{text-align:left} img{max-width:100%}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:8px;align-items:start}
.meta{color:#666;font-size:12px}
"""


def build_report(folder: str | Path) -> tuple[Path, Path]:
    """Write report.md, report.html and plots/*.png into the results folder."""
    results = load_results(folder)
    if not results.sweep:
        raise ValueError(f"{results.folder} holds no sweep.json; run `mlet bench run` first")
    figures = headline(results)
    summary = summary_sentences(figures, results.baseline)
    plots = {
        "latency_throughput": plot_latency_throughput(results),
        "memory": plot_memory(results, figures),
        "accuracy_bytes": plot_accuracy_bytes(results, figures),
        "micro_latency": plot_micro(results),
    }
    plots = {name: png for name, png in plots.items() if png is not None}
    plot_folder = results.folder / "plots"
    plot_folder.mkdir(exist_ok=True)
    for name, png in plots.items():
        (plot_folder / f"{name}.png").write_bytes(png)
    tables = {
        "Headline": headline_rows(figures),
        "In-process latency per batch": micro_rows(results),
        "In-process memory": memory_rows(results),
        "Load sweep": sweep_rows(results),
        "What limited the highest throughput": saturation_rows(results),
    }
    md = markdown_report(results, summary, tables, plots)
    page = html_report(results, summary, tables, plots)
    md_path, html_path = results.folder / "report.md", results.folder / "report.html"
    md_path.write_text(md)
    html_path.write_text(page)
    return md_path, html_path


def environment_lines(results: Results) -> list[str]:
    env = results.environment
    machine = env["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return [
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
        f"{machine['memory_bytes'] / 2**30:.1f} GiB; load average at start "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}.",
        f"Software: {versions}. Commit: {env['git_commit']}.",
        f"Command: `{' '.join(env['command'])}` (created {env['created']}).",
    ]


def markdown_report(results, summary, tables, plots) -> str:
    lines = [f"# Benchmark report: compressed against baseline ({results.baseline})", ""]
    engines = sorted({s.get("engine", "mlet (ours)") for s in results.sweep})
    lines += [f"Serving engine: {', '.join(engines)}.", ""]
    lines += [f"**{s}**" for s in summary] + [""]
    first_title = next(iter(tables))
    lines += [f"## {first_title}", "", markdown_table(*tables[first_title]), "", HEADLINE_NOTE, ""]
    lines += [f"![{name}](plots/{name}.png)" for name in plots] + [""]
    for title, table in list(tables.items())[1:]:
        lines += [f"## {title}", "", markdown_table(*table), ""]
    lines += ["## Reproduce", "", *environment_lines(results), "", NOISE_NOTE, ""]
    return "\n".join(lines)


def html_report(results, summary, tables, plots) -> str:
    def image(name: str, png: bytes) -> str:
        data = base64.b64encode(png).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    titles = list(tables)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Benchmark report: {html.escape(results.baseline)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Compressed against baseline ({html.escape(results.baseline)})</h1>",
        '<div class="summary">' + "".join(f"<p>{html.escape(s)}</p>" for s in summary) + "</div>",
        f"<h2>{html.escape(titles[0])}</h2>",
        html_table(*tables[titles[0]], table_id="headline"),
        f'<p class="meta">{html.escape(HEADLINE_NOTE)}</p>',
        '<div class="plots">' + "".join(image(n, png) for n, png in plots.items()) + "</div>",
    ]
    for title in titles[1:]:
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(*tables[title])]
    parts += ['<h2>Reproduce</h2><div class="meta">']
    parts += [f"<p>{html.escape(line)}</p>" for line in environment_lines(results)]
    parts += [f"<p>{html.escape(NOISE_NOTE)}</p>"]
    parts += ["</div></body></html>"]
    return "\n".join(parts)
