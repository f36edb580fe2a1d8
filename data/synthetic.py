"""The built-in default dataset: Criteo-like rows with labels drawn from a planted model.

13 dense counts and 26 categorical features whose ids follow a Zipf law, like the
frequency skew of real CTR logs. Labels come from a planted model

    logit = bias + sum_t beta_t[x_t] + c * sum_{t<s} <u_t[x_t], u_s[x_s]> + dense effect

where every id has a latent vector u in R^r shared across tables. A dot-product model of
width d can capture at most d of the r latent directions, so with r well above small
widths the data is width-limited by design: wider tables must score better.
Everything is deterministic from the seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mlet.dataset import DataSchema, open_array
from mlet.files import staged_directory, write_json
from mlet.metrics import roc_auc
from mlet.zipf import ZipfSampler

# Criteo Kaggle's mix of tiny and large tables, scaled down to about 20k rows in all so
# that a few hundred thousand rows train every id often enough to learn it.
DEFAULT_TABLE_SIZES = (
    146, 58, 3000, 2000, 30, 3, 1251, 63, 3, 900, 568, 2500, 319,
    3, 1499, 2800, 3, 565, 217, 3, 2600, 3, 3, 1100, 10, 800,
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticConfig:
    rows: int = 500_000
    table_sizes: tuple[int, ...] = DEFAULT_TABLE_SIZES
    num_dense: int = 13
    hotness: int = 1
    zipf_exponent: float = 1.05
    latent_rank: int = 32
    spectrum_decay: float = 0.25
    interaction_std: float = 2.0
    first_order_std: float = 0.6
    dense_std: float = 0.5
    positive_rate: float = 0.25
    seed: int = 0
    chunk_rows: int = 65536

    def __post_init__(self) -> None:
        if self.rows < 10:
            raise ValueError(f"rows must be at least 10, got {self.rows}")
        if self.latent_rank < 1 or self.hotness < 1 or self.num_dense < 1:
            raise ValueError("latent_rank, hotness and num_dense must be positive")
        if not 0 < self.positive_rate < 1:
            raise ValueError("positive_rate must be in (0, 1)")


@dataclass
class PlantedModel:
    """The ground truth the labels are drawn from."""

    samplers: list[ZipfSampler]
    latent: list[np.ndarray]  # per table [N_t, r]
    first_order: list[np.ndarray]  # per table [N_t]
    dense_mu: np.ndarray  # [F] log-scale location of each count
    dense_weight: np.ndarray  # [F]
    interaction_scale: float
    bias: float = 0.0


def build_planted_model(config: SyntheticConfig) -> PlantedModel:
    rng = np.random.default_rng([config.seed, 0])
    samplers = [ZipfSampler(n, config.zipf_exponent, rng) for n in config.table_sizes]
    # A decaying spectrum, as in trained tables: direction i carries weight (i + 1)^-decay,
    # normalised so that the latent vectors keep unit variance per direction on average.
    spectrum = np.arange(1, config.latent_rank + 1) ** -config.spectrum_decay
    spectrum *= math.sqrt(config.latent_rank / np.sum(spectrum**2))
    latent = [
        (rng.standard_normal((n, config.latent_rank)) * spectrum).astype(np.float32)
        for n in config.table_sizes
    ]
    first_order = [
        (config.first_order_std / math.sqrt(len(config.table_sizes)) * rng.standard_normal(n))
        for n in config.table_sizes
    ]
    pairs = len(config.table_sizes) * (len(config.table_sizes) - 1) / 2
    # <u, v> of two standard normal r-vectors has variance r; the sum over pairs has about
    # pairs * r * hotness^2, normalised here to the requested spread.
    spread = math.sqrt(pairs * config.latent_rank) * config.hotness
    dense_weight = rng.standard_normal(config.num_dense)
    dense_weight *= config.dense_std / np.linalg.norm(dense_weight)
    return PlantedModel(
        samplers=samplers,
        latent=latent,
        first_order=first_order,
        dense_mu=rng.uniform(0.5, 4.0, config.num_dense),
        dense_weight=dense_weight,
        interaction_scale=config.interaction_std / spread if pairs else 0.0,
    )


def draw_features(
    planted: PlantedModel, config: SyntheticConfig, rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """dense [n, F] float32 raw counts, sparse [n, T] or [n, T, H] int32."""
    logs = rng.normal(planted.dense_mu, 1.0, size=(rows, config.num_dense))
    dense = np.floor(np.expm1(np.maximum(logs, 0.0))).astype(np.float32)
    # Criteo's I2 holds a few negative values (-1, -2, -3); keep that quirk.
    negatives = rng.random(rows) < 0.05
    dense[negatives, 1] = -rng.integers(1, 4, negatives.sum()).astype(np.float32)
    shape = (rows,) if config.hotness == 1 else (rows, config.hotness)
    sparse = np.stack([s.sample(shape, rng) for s in planted.samplers], axis=1)
    return dense, sparse


def logits(planted: PlantedModel, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """The planted logit of each row, before the bias."""
    rows = len(dense)
    first = np.zeros(rows)
    latent_sum = np.zeros((rows, planted.latent[0].shape[1]))
    latent_sq = np.zeros(rows)
    for t in range(sparse.shape[1]):
        ids = sparse[:, t]
        first += planted.first_order[t][ids].reshape(rows, -1).sum(axis=1)
        vectors = planted.latent[t][ids]  # [n, r] or [n, H, r]
        if vectors.ndim == 3:
            vectors = vectors.sum(axis=1)
        latent_sum += vectors
        latent_sq += np.einsum("nr,nr->n", vectors, vectors)
    # sum_{t<s} <u_t, u_s> = (|sum_t u_t|^2 - sum_t |u_t|^2) / 2
    pairwise = (np.einsum("nr,nr->n", latent_sum, latent_sum) - latent_sq) / 2
    scaled_dense = np.log1p(np.maximum(dense, 0.0)) - planted.dense_mu
    return first + planted.interaction_scale * pairwise + scaled_dense @ planted.dense_weight


def calibrate_bias(planted: PlantedModel, config: SyntheticConfig) -> float:
    """The bias that gives the requested positive rate, found on a pilot sample."""
    rng = np.random.default_rng([config.seed, 1])
    dense, sparse = draw_features(planted, config, 50_000, rng)
    pilot = logits(planted, dense, sparse)
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        rate = np.mean(1 / (1 + np.exp(-(pilot + mid))))
        low, high = (mid, high) if rate < config.positive_rate else (low, mid)
    return (low + high) / 2


def schema_for(config: SyntheticConfig) -> DataSchema:
    return DataSchema(
        num_dense=config.num_dense,
        table_sizes=tuple(config.table_sizes),
        hotness=config.hotness,
        dense_transform="log1p",
        rows=config.rows,
        source={"kind": "synthetic", **asdict(config)},
    )


def generate(config: SyntheticConfig, out: str | Path, overwrite: bool = False) -> DataSchema:
    """Write a synthetic dataset folder to `out` (atomically)."""
    planted = build_planted_model(config)
    planted.bias = calibrate_bias(planted, config)
    schema = schema_for(config)
    sparse_shape = (config.rows, len(config.table_sizes))
    if config.hotness > 1:
        sparse_shape += (config.hotness,)
    with staged_directory(out, replace=overwrite) as staging:
        dense = open_array(staging, "dense", (config.rows, config.num_dense), np.float32)
        sparse = open_array(staging, "sparse", sparse_shape, np.int32)
        labels = open_array(staging, "labels", (config.rows,), np.uint8)
        oracle = np.empty(config.rows)
        with tqdm(total=config.rows, desc="synthesising", unit="row", unit_scale=True) as bar:
            for index, start in enumerate(range(0, config.rows, config.chunk_rows)):
                rows = min(config.chunk_rows, config.rows - start)
                rng = np.random.default_rng([config.seed, 2, index])
                chunk_dense, chunk_sparse = draw_features(planted, config, rows, rng)
                p = 1 / (1 + np.exp(-(logits(planted, chunk_dense, chunk_sparse) + planted.bias)))
                chunk_labels = (rng.random(rows) < p).astype(np.uint8)
                dense[start : start + rows] = chunk_dense
                sparse[start : start + rows] = chunk_sparse
                labels[start : start + rows] = chunk_labels
                oracle[start : start + rows] = p
                bar.update(rows)
        stats = {
            "positive_rate": float(labels.mean()),
            "bias": planted.bias,
            # The best AUC any model can reach on these labels: the planted probabilities'.
            "oracle_auc": roc_auc(labels, oracle),
        }
        for array in (dense, sparse, labels):
            array.flush()
        del dense, sparse, labels
        schema = replace(schema, source={**schema.source, **stats})
        write_json(staging / "schema.json", schema.to_dict())
    return schema
