"""Summary maths for benchmark figures: percentiles, medians of repetitions, spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

NOISY_SPREAD = 0.10  # a spread above this flags a figure as noisy


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not len(values):
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median_and_spread(values: Sequence[float]) -> dict:
    """Median and relative spread ((max - min) / median) of repeated measurements."""
    if not len(values):
        raise ValueError("median of no values")
    values = [float(v) for v in values]
    middle = statistics.median(values)
    spread = (max(values) - min(values)) / middle if middle else 0.0
    return {"median": middle, "spread": spread, "noisy": spread > NOISY_SPREAD, "values": values}


def unmeasured_as_null(data):
    """NaN (what a server at --url leaves unmeasured: its CPU and memory) as JSON null."""
    if isinstance(data, float) and math.isnan(data):
        return None
    if isinstance(data, dict):
        return {k: unmeasured_as_null(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [unmeasured_as_null(v) for v in data]
    return data
