"""Choosing among trained cells the way the study does: by validation AUC, never by test."""

from __future__ import annotations


def best_per_width(groups: list[dict], method: str) -> dict[int, dict]:
    """For each width `dim` of `method`, the group (e.g. the inner width k of an MLET table)
    with the best mean validation AUC, in increasing width."""
    best: dict[int, dict] = {}
    for g in groups:
        if g["method"] == method and (
            g["dim"] not in best or g["val_auc"] > best[g["dim"]]["val_auc"]
        ):
            best[g["dim"]] = g
    return dict(sorted(best.items()))
