"""The embedding tables as TorchRec trains them, behind the interface DLRM expects.

Every table, a full table (N x D) or MLET's wide W1 (N x K), is one table of a TorchRec
`EmbeddingBagCollection`, which `DistributedModelParallel` shards and FBGEMM updates with a
fused optimizer. MLET's W2 projections are one dense [T, D, K] parameter applied after the
lookup; pooling before the projection is exact, as in `mlet.embeddings`. The run saves
each table under `mlet.dlrm.table_key`, so export rebuilds the same network from it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)

from mlet.embeddings import PROJECTION_STD, TableConfig, init_bound

# FBGEMM's fused kernels take tables whose width is a multiple of 4.
WIDTH_MULTIPLE = 4


def table_width(table: TableConfig) -> int:
    """The width the model reads: K for a multi-layer table, D for a full one."""
    return table.hidden or table.dim


def stored_width(table: TableConfig) -> int:
    """The width TorchRec stores: the model's, padded up to FBGEMM's multiple of 4.

    The padding columns are never read, so they get no gradient and never change.
    """
    return -(-table_width(table) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def rowwise_lr_factor(tables: list[TableConfig]) -> float:
    """What keeps row-wise Adagrad's step on padded tables the step on the real width.

    Its state is the mean of a row's squared gradients; zero padding columns shrink that
    mean by width/stored, which a learning rate scaled by sqrt(width/stored) undoes.
    """
    ratios = {table_width(t) / stored_width(t) for t in tables}
    if len(ratios) != 1:
        raise ValueError("TorchRec training needs one table width for every table")
    return ratios.pop() ** 0.5


def bag_config(table: TableConfig, normal_std: float | None) -> EmbeddingBagConfig:
    """One TorchRec table; uniform in +-sqrt(1/N) as DLRM starts, or N(0, std^2)."""
    bound = init_bound(table.rows)
    init = (
        partial(nn.init.normal_, std=normal_std)
        if normal_std is not None
        else partial(nn.init.uniform_, a=-bound, b=bound)
    )
    return EmbeddingBagConfig(
        name=table.name,
        embedding_dim=stored_width(table),
        num_embeddings=table.rows,
        feature_names=[table.name],
        pooling=PoolingType.SUM,
        init_fn=init,
    )


def in_table_order(pooled: KeyedTensor, names: list[str]) -> torch.Tensor:
    """The pooled vectors [B, T, W] with table t at position t.

    Sharded over several processes, the collection answers in its shards' order (for
    example C3, C4, C5, C1, C2), not in the order of its tables; each table's vector must
    meet its own projection and its own place in the interaction, as export rebuilds them.
    """
    if pooled.keys() == names:
        return pooled.values().view(-1, len(names), pooled.length_per_key()[0])
    per_key = pooled.to_dict()
    return torch.stack([per_key[name] for name in names], dim=1)


class TorchRecTables(nn.Module):
    """ids [B, T] or [B, T, H] -> [B, T, D] through an EmbeddingBagCollection.

    `bags` is created on the meta device: `DistributedModelParallel` allocates each shard
    where the plan puts it and initialises it with the table's init_fn, so no unsharded
    copy of a large table ever exists.
    """

    def __init__(self, tables: list[TableConfig], normal_std: float | None = None) -> None:
        super().__init__()
        kinds = {t.kind for t in tables}
        hidden = {t.hidden for t in tables}
        if len(kinds) != 1 or len(hidden) != 1:
            raise ValueError("TorchRec training needs every table full, or every table MLET")
        self.configs = list(tables)
        self.names = [t.name for t in tables]
        self.bags = EmbeddingBagCollection(
            tables=[bag_config(t, normal_std) for t in tables], device=torch.device("meta")
        )
        self.multi_layer = tables[0].hidden is not None
        self.width, self.stored = table_width(tables[0]), stored_width(tables[0])
        if self.multi_layer:
            dim, inner = tables[0].dim, tables[0].hidden
            self.projection = nn.Parameter(torch.empty(len(tables), dim, inner))
            nn.init.normal_(self.projection, std=PROJECTION_STD)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, count = ids.shape[0], len(self.names)
        # KJT values are feature-major: every row's ids of table 0, then of table 1, ...
        per_table = ids.transpose(0, 1)  # [T, B] or [T, B, H]
        hotness = ids.shape[2] if ids.dim() == 3 else 1
        features = KeyedJaggedTensor(
            keys=self.names,
            values=per_table.reshape(-1),
            lengths=torch.full((count * batch,), hotness, dtype=torch.int32, device=ids.device),
        )
        pooled = in_table_order(self.bags(features), self.names)  # [B, T, stored]
        if self.stored != self.width:
            pooled = pooled[..., : self.width]  # [B, T, K or D]
        if not self.multi_layer:
            return pooled
        # one bmm per table over strided views ([T, B, K] x [T, K, D]): einsum would copy
        # the pooled vectors into that layout first, and its gradients back out of it
        projected = torch.bmm(pooled.transpose(0, 1), self.projection.transpose(1, 2))
        return projected.transpose(0, 1)  # [B, T, D]
