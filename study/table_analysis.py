"""What a trained table looks like: spectra, effective rank, low-rank truncation, id frequency.

Shape legend: N rows of a table, D its width, R a rank.
"""

from __future__ import annotations

import numpy as np

from mlet.metrics import roc_auc

FREQUENCY_BUCKETS = ("rare", "middle", "frequent")


def singular_values(table: np.ndarray) -> np.ndarray:
    """Singular values of an [N, D] table, largest first, in float64."""
    return np.linalg.svd(np.asarray(table, dtype=np.float64), compute_uv=False)


def effective_rank(values: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values (Roy and Vetterli, 2007).

    Equals R for R equal non-zero singular values and 1 for a rank-one matrix; a table
    whose spectrum decays fast has an effective rank well below its width.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or (values < 0).any():
        raise ValueError("effective_rank takes a vector of non-negative singular values")
    total = values.sum()
    if total == 0:
        return 0.0
    p = values[values > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def table_spectra(tables: list[np.ndarray]) -> list[dict]:
    """Singular values and effective rank of each table."""
    spectra = []
    for table in tables:
        values = singular_values(table)
        spectra.append(
            {"singular_values": values.tolist(), "effective_rank": effective_rank(values)}
        )
    return spectra


def truncate_rank(table: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-R approximation of an [N, D] table (Eckart-Young), as [N, D]."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    table = np.asarray(table, dtype=np.float64)
    u, s, vt = np.linalg.svd(table, full_matrices=False)
    rank = min(rank, len(s))
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def low_rank_bytes(rows: int, width: int, rank: int, bytes_per_value: int = 4) -> int:
    """Bytes to serve a rank-R approximation of an N x D table: U*S (N x R) and V (R x D)."""
    rank = min(rank, width)
    return (rows * rank + rank * width) * bytes_per_value


def frequency_buckets(train_ids: np.ndarray, test_ids: np.ndarray, buckets: int = 3) -> np.ndarray:
    """Bucket of each test row by how often its id occurs in training: 0 rarest.

    Thresholds are the quantiles of the test rows' training counts, so that the buckets
    hold about equal numbers of test rows; rows with equal counts share a bucket, so sizes
    can differ where one count (for example ids never seen in training) covers many rows.
    """
    train_ids = np.asarray(train_ids).ravel()
    test_ids = np.asarray(test_ids).ravel()
    size = int(max(train_ids.max(initial=0), test_ids.max(initial=0))) + 1
    counts = np.bincount(train_ids, minlength=size)[test_ids]
    edges = np.quantile(counts, np.linspace(0, 1, buckets + 1)[1:-1])
    return np.searchsorted(edges, counts, side="left").astype(np.int64)


def bucket_auc(
    labels: np.ndarray, scores: np.ndarray, buckets: np.ndarray, names=FREQUENCY_BUCKETS
) -> dict[str, dict]:
    """ROC AUC and row count of each bucket (AUC None where a bucket has one class only)."""
    labels, scores, buckets = (np.asarray(a).ravel() for a in (labels, scores, buckets))
    result = {}
    for index, name in enumerate(names):
        mask = buckets == index
        positives = int(labels[mask].sum())
        both_classes = 0 < positives < int(mask.sum())
        result[name] = {
            "rows": int(mask.sum()),
            "auc": roc_auc(labels[mask], scores[mask]) if both_classes else None,
        }
    return result
