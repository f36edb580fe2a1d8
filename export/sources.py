"""Where the exporter reads a model's weights: a run's weights file or a model in memory.

Both give the MLPs whole (they are small) and every table as collapsed float32 rows, a
range at a time, so that a table of tens of millions of rows is collapsed and written
block by block and never exists whole, neither as W1 nor as E = W1 @ W2.

Both also build the reference model of a check: the trained (uncollapsed) PyTorch model
restricted to the rows that the check's inputs touch, with the ids renumbered to match.
Its output on those inputs is the trained model's output, whatever the table sizes, so
every export is compared with PyTorch, including one whose checkpoint is larger than
memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlet.dlrm import DLRM, DLRMConfig, build_mlps, table_key
from mlet.run import WEIGHTS_FILE, Run
from mlet.weights import SafetensorsReader


def collapse_rows(wide: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """E rows = W1 rows @ W2^T computed in float64 (as MultiLayerEmbedding.collapse), as float32.

    wide: [n, K] float32, projection: [D, K] (nn.Linear's layout) -> [n, D].
    """
    return (wide.astype(np.float64) @ projection.astype(np.float64).T).astype(np.float32)


class ModelWeights(ABC):
    """A DLRM's weights, readable without loading every table."""

    config: DLRMConfig

    @abstractmethod
    def dense_state(self) -> dict[str, torch.Tensor]:
        """State-dict entries of the bottom and top MLPs."""

    @abstractmethod
    def table_state(self, index: int, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Table `index`'s entries ("table.weight", "projection.weight") at sorted unique ids."""

    @abstractmethod
    def collapsed_rows(self, index: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of table `index` after collapse: float32 [stop - start, D]."""

    def close(self) -> None:  # noqa: B027 (optional: only file-backed weights hold files)
        """Release open files."""

    def mlps(self) -> tuple[nn.Sequential, nn.Sequential]:
        bottom, top = build_mlps(self.config)
        state = self.dense_state()
        for prefix, module in (("bottom.", bottom), ("top.", top)):
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            module.load_state_dict(part)
        return bottom.eval(), top.eval()

    def reference_model(self, sparse: np.ndarray) -> tuple[DLRM, np.ndarray]:
        """The trained model on just the rows `sparse` [B, T(, H)] uses; `sparse` renumbered."""
        check_ids(self.config, sparse)
        remapped = np.empty(sparse.shape, dtype=np.int64)
        tables = []
        state = dict(self.dense_state())
        for index, table in enumerate(self.config.tables):
            unique, inverse = np.unique(sparse[:, index], return_inverse=True)
            remapped[:, index] = inverse.reshape(sparse[:, index].shape)
            tables.append(replace(table, rows=len(unique)))
            for key, value in self.table_state(index, unique).items():
                state[f"embeddings.tables.{index}.{key}"] = value
        model = DLRM(replace(self.config, tables=tuple(tables)), sparse=False)
        model.load_state_dict(state)
        return model.eval(), remapped


def check_ids(config: DLRMConfig, sparse: np.ndarray) -> None:
    expected = 3 if config.hotness > 1 else 2
    if sparse.ndim != expected or sparse.shape[1] != len(config.tables):
        raise ValueError(
            f"sparse ids of shape {sparse.shape} do not fit {len(config.tables)} tables"
        )
    for index, table in enumerate(config.tables):
        column = sparse[:, index]
        if column.size and (column.min() < 0 or column.max() >= table.rows):
            raise ValueError(
                f"sparse ids of table {table.name} must be in 0..{table.rows - 1}, "
                f"got {column.min()}..{column.max()}"
            )


class RunWeights(ModelWeights):
    """A run's model.safetensors read in row ranges (see mlet.weights for why not mmap)."""

    def __init__(self, run: Run) -> None:
        self.config = run.model_config
        self.reader = SafetensorsReader(Path(run.path) / WEIGHTS_FILE)
        self._projections: dict[int, np.ndarray] = {}
        self._check_layout()

    def _check_layout(self) -> None:
        bottom, top = build_mlps(self.config)
        expected = {f"bottom.{k}": tuple(v.shape) for k, v in bottom.state_dict().items()}
        expected |= {f"top.{k}": tuple(v.shape) for k, v in top.state_dict().items()}
        for index, table in enumerate(self.config.tables):
            width = table.hidden if table.hidden is not None else table.dim
            expected[table_key(index, "table")] = (table.rows, width)
            if table.hidden is not None:
                expected[table_key(index, "projection")] = (table.dim, table.hidden)
        for name, shape in expected.items():
            if name not in self.reader.entries:
                raise ValueError(f"{self.reader.path} lacks tensor {name} that the config implies")
            entry = self.reader.entries[name]
            if entry.shape != shape or entry.dtype != np.float32:
                raise ValueError(
                    f"{self.reader.path}: tensor {name} is {entry.dtype} {list(entry.shape)}, "
                    f"the config implies float32 {list(shape)}"
                )

    def close(self) -> None:
        self.reader.close()

    def dense_state(self) -> dict[str, torch.Tensor]:
        return {
            name: torch.from_numpy(self.reader.read(name).copy())
            for name in self.reader.entries
            if name.startswith(("bottom.", "top."))
        }

    def _projection(self, index: int) -> np.ndarray:
        if index not in self._projections:
            self._projections[index] = self.reader.read(table_key(index, "projection"))
        return self._projections[index]

    def table_state(self, index: int, ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.reader.take_rows(table_key(index, "table"), ids)
        state = {"table.weight": torch.from_numpy(rows)}
        if self.config.tables[index].hidden is not None:
            state["projection.weight"] = torch.from_numpy(self._projection(index).copy())
        return state

    def collapsed_rows(self, index: int, start: int, stop: int) -> np.ndarray:
        rows = self.reader.read_rows(table_key(index, "table"), start, stop)
        if self.config.tables[index].hidden is None:
            return rows.copy()
        return collapse_rows(rows, self._projection(index))


class MemoryWeights(ModelWeights):
    """A model already in memory (tests, small models)."""

    def __init__(self, model: DLRM) -> None:
        self.config = model.config
        self.state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def dense_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if k.startswith(("bottom.", "top."))}

    def table_state(self, index: int, ids: np.ndarray) -> dict[str, torch.Tensor]:
        prefix = f"embeddings.tables.{index}."
        index_tensor = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        state = {"table.weight": self.state[table_key(index, "table")][index_tensor]}
        if self.config.tables[index].hidden is not None:
            state["projection.weight"] = self.state[prefix + "projection.weight"]
        return state

    def collapsed_rows(self, index: int, start: int, stop: int) -> np.ndarray:
        rows = self.state[table_key(index, "table")][start:stop].numpy()
        if self.config.tables[index].hidden is None:
            return rows.astype(np.float32, copy=True)
        return collapse_rows(rows, self.state[table_key(index, "projection")].numpy())
