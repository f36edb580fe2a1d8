"""Markdown tables, written one way for every report of every stage."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A table without a trailing newline. `align` holds one letter per column, "l" or "r";
    empty, no column carries an alignment mark."""
    if align and len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    marks = ["---:" if a == "r" else "---" for a in align] if align else ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
