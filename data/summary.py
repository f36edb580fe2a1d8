"""The summary printed at the end of every conversion and stored in schema.json."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlet.formats import SourceFormat


@dataclass
class Summary:
    """Running counts over the rows read (B rows, T tables, H hotness per batch)."""

    dense_names: tuple[str, ...]
    table_names: tuple[str, ...]
    rows: int = 0
    positives: int = 0
    empty_dense: np.ndarray | None = None  # [F]
    empty_tables: np.ndarray | None = None  # [T] rows whose table has no value
    held_out_values: np.ndarray | None = None  # [T] values present in validation/test rows
    held_out_oov: np.ndarray | None = None  # [T] of those, out of vocabulary

    @classmethod
    def start(cls, fmt: SourceFormat, transform) -> Summary:
        tables = len(transform.tables)
        return cls(
            dense_names=fmt.dense,
            table_names=fmt.table_names,
            empty_dense=np.zeros(len(fmt.dense), np.int64),
            empty_tables=np.zeros(tables, np.int64),
            held_out_values=np.zeros(tables, np.int64),
            held_out_oov=np.zeros(tables, np.int64),
        )

    def add(self, features) -> None:
        """Rows, clicks and empty values of one batch (every row, whatever its split)."""
        self.rows += len(features.dense)
        if features.labels is not None:
            self.positives += int(features.labels.sum(dtype=np.int64))
        self.empty_dense += features.empty_dense
        self.empty_tables += features.empty_tables

    def add_held_out(self, values: np.ndarray, oov: np.ndarray) -> None:
        """Value counts [T] of validation/test rows (`value_counts` of their ids)."""
        self.held_out_values += values
        self.held_out_oov += oov

    def to_dict(self, transform, rows: int, seconds: float) -> dict:
        tables = {}
        for t, table in enumerate(transform.tables):
            entry = {
                "rows": table.rows,
                "encoding": table.encoding,
                "empty": int(self.empty_tables[t]),
            }
            if table.encoding == "vocab":
                values = int(self.held_out_values[t])
                entry["held_out_oov_share"] = int(self.held_out_oov[t]) / values if values else 0.0
            tables[table.name] = entry
        return {
            "rows": rows,
            "click_rate": self.positives / rows if rows else 0.0,
            "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds) if seconds > 0 else None,
            "empty_dense": {
                n: int(c) for n, c in zip(self.dense_names, self.empty_dense, strict=True)
            },
            "tables": tables,
            "table_bytes_at_d16": 4 * 16 * sum(t.rows for t in transform.tables),
        }


def format_summary(summary: dict) -> str:
    """The summary as a few lines of text for the terminal."""
    rows = summary["rows"]
    lines = [
        f"{rows:,} rows, click rate {summary['click_rate']:.4f}, "
        f"{summary['seconds']:.1f} s ({summary['rows_per_s'] or 0:,} rows/s)",
    ]
    empty = {n: c for n, c in summary["empty_dense"].items() if c}
    if summary["empty_dense"]:
        text = ", ".join(f"{n} {c / rows:.1%}" for n, c in empty.items()) or "none"
        lines.append(f"empty dense values: {text}")
    table_rows = sum(t["rows"] for t in summary["tables"].values())
    lines.append(
        f"{len(summary['tables'])} tables, {table_rows:,} rows in all "
        f"({summary['table_bytes_at_d16'] / 1e6:,.1f} MB at width 16, fp32)"
    )
    lines.append(f"{'table':<18}{'rows':>12}{'empty':>9}{'val/test OOV':>14}")
    for name, t in summary["tables"].items():
        oov = f"{t['held_out_oov_share']:.1%}" if "held_out_oov_share" in t else "(hash)"
        lines.append(f"{name:<18}{t['rows']:>12,}{t['empty'] / rows:>9.1%}{oov:>14}")
    return "\n".join(lines)
