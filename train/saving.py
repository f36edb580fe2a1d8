"""The run's model.safetensors, written from the sharded model in row blocks.

The file holds what `mlet.dlrm.DLRM` loads: the MLPs under their own names, table i's
W1 (or full table) under `table_key(i, "table")` and MLET's W2 under
`table_key(i, "projection")`. With one process every shard is local and blocks are copied
straight from FBGEMM's buffer; with several, each table is gathered to rank 0 in turn.
No copy of all tables exists at any time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from mlet.dlrm import DLRMConfig, table_key
from mlet.weights import SafetensorsWriter
from train.tables import table_width

BLOCK_ROWS = 1 << 18
BAGS_PREFIX = "embeddings.bags.embedding_bags."
PROJECTION = "embeddings.projection"


def dense_state(state: dict) -> dict[str, torch.Tensor]:
    """The MLPs' tensors of a sharded model's state dict, under DLRM's names."""
    return {
        k: v for k, v in state.items() if not k.startswith("embeddings.") and torch.is_tensor(v)
    }


def local_rows(table: ShardedTensor, start: int, stop: int, width: int) -> np.ndarray:
    """Rows [start, stop) of a table whose shards are all on this process, `width` wide.

    Columns past `width` are FBGEMM's padding (`train.tables.stored_width`) and dropped.
    """
    block = np.empty((stop - start, stored_width_of(table)), dtype=np.float32)
    for shard in table.local_shards():
        row0, col0 = shard.metadata.shard_offsets
        rows, cols = shard.metadata.shard_sizes
        lo, hi = max(start, row0), min(stop, row0 + rows)
        if lo < hi:
            part = shard.tensor[lo - row0 : hi - row0].detach().float().cpu().numpy()
            block[lo - start : hi - start, col0 : col0 + cols] = part
    return block[:, :width]


def stored_width_of(table: ShardedTensor) -> int:
    return table.size(1)


def table_blocks(table: ShardedTensor, rows: int, width: int, rank: int) -> Iterator[np.ndarray]:
    """A table's rows in blocks, on rank 0; the other ranks take part in the gather."""
    if dist.get_world_size() == 1:
        for start in range(0, rows, BLOCK_ROWS):
            yield local_rows(table, start, min(start + BLOCK_ROWS, rows), width)
        return
    full = torch.empty(rows, stored_width_of(table), dtype=torch.float32) if rank == 0 else None
    table.gather(dst=0, out=full)
    if rank == 0:
        yield from (full[s : s + BLOCK_ROWS, :width].numpy() for s in range(0, rows, BLOCK_ROWS))


def weights_layout(config: DLRMConfig, dense: dict[str, torch.Tensor]) -> dict:
    layout = {k: (np.float32, tuple(v.shape)) for k, v in dense.items()}
    for i, table in enumerate(config.tables):
        layout[table_key(i, "table")] = (np.float32, (table.rows, table_width(table)))
        if table.hidden is not None:
            layout[table_key(i, "projection")] = (np.float32, (table.dim, table.hidden))
    return layout


def write_weights(sharded_model, config: DLRMConfig, path: Path | None, rank: int) -> None:
    """Write model.safetensors at `path` on rank 0; every rank must call this."""
    state = sharded_model.state_dict()
    dense = dense_state(state)
    writer = None
    if rank == 0:
        writer = SafetensorsWriter(path, weights_layout(config, dense), {"format": "mlet-run-v1"})
    try:
        for name, tensor in dense.items():
            if writer and tensor.numel():  # an empty tensor is complete once declared
                writer.write(name, tensor.detach().float().cpu().numpy())
        for i, table in enumerate(config.tables):
            sharded = state[f"{BAGS_PREFIX}{table.name}.weight"]
            for block in table_blocks(sharded, table.rows, table_width(table), rank):
                writer.write(table_key(i, "table"), block)
            if writer and table.hidden is not None:
                projection = state[PROJECTION][i].detach().float().cpu().numpy()
                writer.write(table_key(i, "projection"), projection)
    except BaseException:
        if writer:
            writer.__exit__(RuntimeError, None, None)
        raise
    if writer:
        writer.close()
