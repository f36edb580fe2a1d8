"""Embedding tables: a full table and a multi-layer (MLET) table behind one interface.

Shape legend: B batch, T tables, H hotness (ids per table per row), N rows of a table,
K inner width of a multi-layer table, D output width.

A multi-layer table is a wide table W1 (N x K) followed by a bias-free projection
W2 (K -> D). Nothing nonlinear sits between them, so after training the pair collapses
exactly into one N x D table E = W1 @ W2 and inference pays nothing for the extra layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

EMBEDDING_KINDS = ("full", "mlet")


@dataclass(frozen=True)
class TableConfig:
    """One categorical feature's table.

    name: feature name (e.g. "C1"); rows: N, the number of ids; dim: D, the width the
    model sees; hidden: K, the inner width of a multi-layer table (None for a full table).
    Ids of a row are summed (sum pooling) when the hotness H is above one.
    """

    name: str
    rows: int
    dim: int
    hidden: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise ValueError(f"table {self.name}: rows must be positive, got {self.rows}")
        if self.dim < 1:
            raise ValueError(f"table {self.name}: dim must be positive, got {self.dim}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"table {self.name}: hidden must be positive, got {self.hidden}")

    @property
    def kind(self) -> str:
        return "full" if self.hidden is None else "mlet"

    @property
    def inference_params(self) -> int:
        """Parameters of the table once collapsed: what serving holds in memory."""
        return self.rows * self.dim

    @property
    def training_params(self) -> int:
        if self.hidden is None:
            return self.rows * self.dim
        return self.rows * self.hidden + self.hidden * self.dim


def _pool(vectors: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over the hotness axis when ids carry one: [B, H, X] -> [B, X]."""
    return vectors.sum(dim=1) if ids.dim() == 2 else vectors


PROJECTION_STD = 0.25  # the paper's initialisation of W2


def init_bound(rows: int) -> float:
    """Tables start uniform in +-sqrt(1/N), as DLRM initialises them."""
    return math.sqrt(1.0 / rows)


class FullEmbedding(nn.Module):
    """A plain N x D table, initialised as DLRM does: uniform in +-sqrt(1/N)."""

    def __init__(self, config: TableConfig, sparse: bool = True) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.rows, config.dim, sparse=sparse)
        bound = init_bound(config.rows)
        nn.init.uniform_(self.table.weight, -bound, bound)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] or [B, H] -> [B, D]."""
        return _pool(self.table(ids), ids)

    def collapse(self) -> torch.Tensor:
        return self.table.weight.detach().float().clone()


class MultiLayerEmbedding(nn.Module):
    """W1 (N x K) then W2 (K -> D, no bias, no activation).

    Initialisation follows the paper: W1 uniform in +-sqrt(1/N), W2 normal with std 0.25.
    """

    def __init__(
        self, config: TableConfig, sparse: bool = True, projection_std: float = PROJECTION_STD
    ):
        super().__init__()
        if config.hidden is None:
            raise ValueError(f"table {config.name}: a multi-layer table needs hidden (K)")
        self.config = config
        self.table = nn.Embedding(config.rows, config.hidden, sparse=sparse)
        self.projection = nn.Linear(config.hidden, config.dim, bias=False)
        bound = init_bound(config.rows)
        nn.init.uniform_(self.table.weight, -bound, bound)
        nn.init.normal_(self.projection.weight, std=projection_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] or [B, H] -> [B, D]; pooling before the projection is exact and cheaper."""
        return self.projection(_pool(self.table(ids), ids))

    def collapse(self, block_rows: int = 65536) -> torch.Tensor:
        """E = W1 @ W2 computed in float64, returned as float32 [N, D].

        Works through W1 in row blocks so that a large table never exists in float64 whole.
        """
        wide = self.table.weight.detach()  # [N, K]
        projection_t = self.projection.weight.detach().double().T  # [K, D]
        collapsed = torch.empty(self.config.rows, self.config.dim, dtype=torch.float32)
        for start in range(0, self.config.rows, block_rows):
            block = wide[start : start + block_rows].double()
            collapsed[start : start + block_rows] = (block @ projection_t).float()
        return collapsed


Embedding = FullEmbedding | MultiLayerEmbedding


def make_embedding(config: TableConfig, sparse: bool = True) -> Embedding:
    if config.hidden is None:
        return FullEmbedding(config, sparse=sparse)
    return MultiLayerEmbedding(config, sparse=sparse)


class EmbeddingCollection(nn.Module):
    """All tables of a model, as export and serving hold them; looks up [B, T] or
    [B, T, H] ids table by table. (Training holds the tables in TorchRec: `train.tables`.)
    """

    def __init__(self, tables: list[TableConfig], sparse: bool = True) -> None:
        super().__init__()
        self.configs = list(tables)
        self.tables = nn.ModuleList(make_embedding(t, sparse=sparse) for t in tables)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] or [B, T, H] -> [B, T, D]."""
        return torch.stack([table(ids[:, i]) for i, table in enumerate(self.tables)], dim=1)

    def collapse(self) -> list[torch.Tensor]:
        return [table.collapse() for table in self.tables]
