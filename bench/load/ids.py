"""Which ids a load sends: uniform, Zipf-skewed with an exponent fitted on a real log, or
replayed from a converted dataset's own id frequencies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlet.dataset import load_dataset
from mlet.zipf import ZipfSampler

ID_KINDS = ("uniform", "zipf", "dataset")
COUNT_CHUNK_ROWS = 1 << 20  # rows of a memory-mapped split counted at a time


class UniformSampler:
    """Every id of a table equally likely."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def sample(self, size, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.rows, size=size, dtype=np.int64)


class EmpiricalSampler:
    """Ids drawn with the frequencies `counts` gives to `ids`."""

    def __init__(self, ids: np.ndarray, counts: np.ndarray) -> None:
        if len(ids) == 0 or counts.sum() <= 0:
            raise ValueError("an empirical sampler needs at least one id seen at least once")
        self.ids = np.asarray(ids, dtype=np.int64)
        self.cdf = np.cumsum(counts, dtype=np.float64)
        self.cdf /= self.cdf[-1]

    def sample(self, size, rng: np.random.Generator) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.ids[np.minimum(ranks, len(self.ids) - 1)]


def table_counts(folder: str | Path) -> tuple[list[np.ndarray], list[str], tuple[int, ...]]:
    """How often each id of each table occurs in a converted dataset, counted a chunk of
    the memory-mapped sparse array at a time: (counts per table, names, table sizes)."""
    dataset = load_dataset(folder)
    schema = dataset.schema
    counts = [np.zeros(n, dtype=np.int64) for n in schema.table_sizes]
    for start in range(0, len(dataset), COUNT_CHUNK_ROWS):
        chunk = np.asarray(dataset.sparse[start : start + COUNT_CHUNK_ROWS])
        for table, n in enumerate(schema.table_sizes):
            counts[table] += np.bincount(chunk[:, table].ravel(), minlength=n)[:n]
    names = list(schema.table_names)
    return counts, names, tuple(schema.table_sizes)


def fit_zipf_exponent(counts: np.ndarray) -> float:
    """The maximum-likelihood exponent a of p(rank r) ~ r^-a over the ids seen, on ranks
    1..N of the counts sorted in decreasing order (a bounded golden-section search)."""
    frequencies = np.sort(counts[counts > 0])[::-1].astype(np.float64)
    if len(frequencies) < 2:
        raise ValueError("fitting a Zipf exponent needs at least two distinct ids")
    log_ranks = np.log(np.arange(1, len(frequencies) + 1, dtype=np.float64))
    weighted, total = float(frequencies @ log_ranks), float(frequencies.sum())

    def negative_log_likelihood(a: float) -> float:
        return a * weighted + total * float(np.log(np.exp(-a * log_ranks).sum()))

    low, high = 0.0, 4.0
    golden = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        left, right = high - golden * (high - low), low + golden * (high - low)
        if negative_log_likelihood(left) < negative_log_likelihood(right):
            high = right
        else:
            low = left
    return (low + high) / 2


@dataclass(frozen=True)
class ZipfFit:
    """The exponent fitted on the largest table of a real log, and every table's fit."""

    dataset: str
    table: str
    exponent: float
    per_table: dict[str, float]


def fit_zipf_on_dataset(folder: str | Path, min_ids: int = 100) -> ZipfFit:
    counts, names, sizes = table_counts(folder)
    fits = {
        name: fit_zipf_exponent(c)
        for name, c, n in zip(names, counts, sizes, strict=True)
        if np.count_nonzero(c) >= min(min_ids, n)
    }
    largest = max(range(len(sizes)), key=lambda i: np.count_nonzero(counts[i]))
    return ZipfFit(str(folder), names[largest], fits[names[largest]], fits)


def replayed_samplers(
    folder: str | Path, table_rows: tuple[int, ...], rng: np.random.Generator
) -> tuple[list[EmpiricalSampler], str]:
    """Samplers that replay a dataset's id frequencies on a model's tables, and how.

    A model of the dataset's own tables gets its ids as they were logged. A model of other
    tables gets each dataset table's frequency profile by rank: its most frequent id
    becomes a random id of the model's table, and so on down, cut at the model's rows.
    """
    counts, names, sizes = table_counts(folder)
    if tuple(sizes) == tuple(table_rows):
        samplers = [EmpiricalSampler(np.flatnonzero(c), c[c > 0]) for c in counts]
        return samplers, f"ids of {folder} as logged"
    samplers = []
    for index, rows in enumerate(table_rows):
        source = counts[index % len(counts)]
        profile = np.sort(source[source > 0])[::-1][:rows]
        samplers.append(EmpiricalSampler(rng.permutation(rows)[: len(profile)], profile))
    return samplers, (
        f"rank-frequency profiles of {folder}'s {len(counts)} tables ({', '.join(names)}) "
        f"mapped by rank onto the model's {len(table_rows)} tables, in turn"
    )


def id_samplers(
    kind: str,
    table_rows: tuple[int, ...],
    seed: int,
    zipf_exponent: float | None = None,
    dataset: str | Path | None = None,
) -> tuple[list, str]:
    """The samplers of one kind of ids for every table, and a line saying what they are."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return [UniformSampler(n) for n in table_rows], "uniform over every row"
    if kind == "zipf":
        if zipf_exponent is None:
            raise ValueError("zipf ids need an exponent")
        samplers = [ZipfSampler(n, zipf_exponent, rng) for n in table_rows]
        return samplers, f"Zipf, exponent {zipf_exponent:.3f}, ranks permuted per table"
    if kind == "dataset":
        if dataset is None:
            raise ValueError("dataset ids need --ids-from DATASET")
        return replayed_samplers(dataset, table_rows, rng)
    raise ValueError(f"ids must be one of {ID_KINDS}, got {kind!r}")
