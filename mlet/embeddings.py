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
    """A plain N x D table, initialised as DLRM does: uniform in +-sqrt(1/N).

    `deduplicate_rows`: whether `EmbeddingCollection` may look up each distinct id of a
    training batch once (the same function; see there).
    """

    deduplicate_rows: bool = True

    def __init__(self, config: TableConfig, sparse: bool = True) -> None:
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.rows, config.dim, sparse=sparse)
        bound = init_bound(config.rows)
        nn.init.uniform_(self.table.weight, -bound, bound)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B] or [B, H] -> [B, D]."""
        return _pool(self.table(ids), ids)

    def lookup_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [U] -> [U, D], one vector per id, no pooling."""
        return self.table(ids)

    def collapse(self) -> torch.Tensor:
        return self.table.weight.detach().float().clone()


class MultiLayerEmbedding(nn.Module):
    """W1 (N x K) then W2 (K -> D, no bias, no activation).

    Initialisation follows the paper: W1 uniform in +-sqrt(1/N), W2 normal with std 0.25.
    In training, each distinct id of a batch is looked up and projected once
    (`deduplicate_rows`; the result is the same function).
    """

    deduplicate_rows: bool = True

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
        if self.deduplicate_rows and self.training and torch.is_grad_enabled():
            return self._forward_distinct_rows(ids)
        return self.projection(_pool(self.table(ids), ids))

    def lookup_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [U] -> [U, D], one vector per id, no pooling."""
        return self.projection(self.table(ids))

    def _forward_distinct_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The same function, projecting each distinct id once.

        Skewed ids repeat within a batch, so looking up and projecting the U distinct rows
        and then gathering [B, D] makes the K-wide work (lookup, projection, the sparse
        gradient of W1 and its optimizer step) scale with U instead of B.
        """
        unique, inverse = torch.unique(ids, return_inverse=True)  # [U], like ids
        return _pool(self.lookup_rows(unique)[inverse], ids)

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


def _distinct(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(ids, return_inverse=True) for ids in [0, rows): [U] sorted, like ids.

    When the id space is small next to the batch, marking the ids seen in a [rows] mask
    (O(rows), no sort) is cheaper than unique()'s sort; on CPU, 1 thread, 13,312 ids:
    0.23 ms against 0.71 ms with 20k rows, 4.6 ms against 0.70 ms with 1.6M rows.
    """
    if rows > 2 * ids.numel():
        return torch.unique(ids, return_inverse=True)
    seen = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    seen[ids.flatten()] = True
    rank = torch.cumsum(seen, 0) - 1  # [rows]: an id's position among the distinct ids
    return seen.nonzero().squeeze(1), rank[ids]


def _along_tables(per_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A [T] tensor shaped to broadcast against ids [B, T] or [B, T, H]."""
    return per_table.view(1, -1, *[1] * (ids.dim() - 2))


class EmbeddingCollection(nn.Module):
    """All tables of a model; looks up one [B, T] or [B, T, H] id tensor at once.

    In training, when all tables share D and keep row dedup on (full, multi-layer or a
    mix), each distinct id of the batch is looked up once: the distinct ids of all tables
    are found in one pass over a shared id space (table i's ids offset by the rows of
    tables 0..i-1), each table looks up (and a multi-layer table projects) only its own,
    and one gather returns [B, T, D]. Two things make this cheaper than table by table:
    on CPU, with many small tables, each op's fixed dispatch cost outweighs its
    arithmetic, so one pass beats T; and every table's sparse gradient then holds each
    row once, in ascending order, so the optimizer need not coalesce it
    (`train.sparse_adagrad`). Mixed D and evaluation go table by table.
    """

    def __init__(self, tables: list[TableConfig], sparse: bool = True) -> None:
        super().__init__()
        self.configs = list(tables)
        self.tables = nn.ModuleList(make_embedding(t, sparse=sparse) for t in tables)
        rows = torch.tensor([t.rows for t in tables], dtype=torch.int64)
        # Not persistent: derived from the configs, so checkpoints keep their keys.
        self.register_buffer("table_rows", rows, persistent=False)
        self.register_buffer("id_offsets", torch.cumsum(rows, 0) - rows, persistent=False)
        self.total_rows = int(rows.sum())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] or [B, T, H] -> [B, T, D]."""
        if self.training and torch.is_grad_enabled() and self._deduplicates_together():
            return self._forward_distinct_rows(ids)
        return torch.stack([table(ids[:, i]) for i, table in enumerate(self.tables)], dim=1)

    def _deduplicates_together(self) -> bool:
        return len({t.dim for t in self.configs}) == 1 and all(
            t.deduplicate_rows for t in self.tables
        )

    def _forward_distinct_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The same function as table by table, each distinct id looked up once.

        The [U, D] vectors of the distinct ids are gathered back to [B, T, D]. For
        multi-layer tables, gathering D-wide rows is what keeps this cheap: gathering
        K-wide rows to [T, B, K] for one batched matmul with the stacked projections was
        measured slower at k=128 and no faster at k=16 (docs/results.md, "Training
        overhead").
        """
        self._check_ids_in_range(ids)
        offsets = _along_tables(self.id_offsets, ids)
        unique, inverse = _distinct(ids + offsets, self.total_rows)  # [U], like ids
        # unique is sorted, so each table's ids are one contiguous run, starting at its offset
        starts = torch.searchsorted(unique, self.id_offsets)  # [T]
        sizes = torch.diff(starts, append=starts.new_tensor([unique.numel()]))  # [T]
        local = unique - self.id_offsets.repeat_interleave(sizes)  # [U], ids within a table
        vectors = torch.cat(
            [
                table.lookup_rows(table_ids)
                for table, table_ids in zip(self.tables, local.split(sizes.tolist()), strict=True)
            ]
        )  # [U, D]
        gathered = vectors.index_select(0, inverse.flatten()).view(*inverse.shape, -1)
        return gathered.sum(dim=2) if ids.dim() == 3 else gathered  # [B, T, D]

    def _check_ids_in_range(self, ids: torch.Tensor) -> None:
        """Refuse an id outside its table, as nn.Embedding does table by table.

        In the shared id space an id past its table's rows would silently read the next
        table's rows.
        """
        outside = (ids < 0) | (ids >= _along_tables(self.table_rows, ids))
        if bool(outside.any()):
            position = outside.nonzero()[0].tolist()
            table = self.configs[position[1]]
            raise IndexError(
                f"table {table.name}: ids must lie in [0, {table.rows}), "
                f"got {int(ids[tuple(position)])}"
            )

    def collapse(self) -> list[torch.Tensor]:
        return [table.collapse() for table in self.tables]
