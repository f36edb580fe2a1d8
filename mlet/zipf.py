"""Skewed ids like those of real click logs, for generated data and request bodies alike."""

from __future__ import annotations

import numpy as np


class ZipfSampler:
    """Draws ids of one table: rank r has probability proportional to (r + 1)^-a.

    Ranks are mapped to ids through a fixed permutation, so frequent ids are not simply
    the small ones.
    """

    def __init__(self, rows: int, exponent: float, rng: np.random.Generator) -> None:
        weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.ids = rng.permutation(rows).astype(np.int32)

    def sample(self, size, rng: np.random.Generator) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.ids[np.minimum(ranks, len(self.ids) - 1)]
