"""DLRM: bottom MLP over dense features, pairwise dot interaction, top MLP, one logit.

Shape legend: B batch, F dense features, T tables, H hotness, D embedding width,
P = (T + 1) * T / 2 pairwise interactions between the T table vectors and the bottom output.

The dense transform (Criteo: log(1 + max(x, 0))) lives inside the model so that an
exported graph takes the raw values a client logged, not what the trainer saw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from mlet.embeddings import EMBEDDING_KINDS, EmbeddingCollection, TableConfig

DENSE_TRANSFORMS = ("log1p", "identity")
INTERACTIONS = ("dot", "cat")


@dataclass(frozen=True)
class DLRMConfig:
    """Everything needed to rebuild the model without training code."""

    num_dense: int
    tables: tuple[TableConfig, ...]
    bottom_mlp: tuple[int, ...] = (64,)
    top_mlp: tuple[int, ...] = (64, 32)
    dense_transform: str = "log1p"
    hotness: int = 1
    interaction: str = "dot"  # "dot": pairwise dot products (DLRM); "cat": concatenation

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("a DLRM needs at least one table")
        dims = {t.dim for t in self.tables}
        if len(dims) != 1:
            raise ValueError(f"dot interaction needs one width for every table, got {dims}")
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise ValueError(
                f"dense_transform must be one of {DENSE_TRANSFORMS}, got {self.dense_transform!r}"
            )
        if self.hotness < 1:
            raise ValueError(f"hotness must be positive, got {self.hotness}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        for name in ("bottom_mlp", "top_mlp"):
            if any(width < 1 for width in getattr(self, name)):
                raise ValueError(f"{name} widths must be positive, got {getattr(self, name)}")

    @property
    def dim(self) -> int:
        return self.tables[0].dim

    @property
    def embedding_kind(self) -> str:
        kinds = {t.kind for t in self.tables}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def num_interactions(self) -> int:
        vectors = len(self.tables) + 1
        return vectors * (vectors - 1) // 2

    @property
    def top_input_width(self) -> int:
        """dot: the bottom output and the P pairwise dots; cat: all T+1 vectors."""
        if self.interaction == "cat":
            return (len(self.tables) + 1) * self.dim
        return self.dim + self.num_interactions

    def collapsed(self) -> DLRMConfig:
        """The same model with every table a full table of its output width."""
        tables = tuple(replace(t, hidden=None) for t in self.tables)
        return replace(self, tables=tables)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DLRMConfig:
        data = dict(data)
        data["tables"] = tuple(TableConfig(**t) for t in data["tables"])
        data["bottom_mlp"] = tuple(data["bottom_mlp"])
        data["top_mlp"] = tuple(data["top_mlp"])
        return cls(**data)


def build_config(
    num_dense: int,
    table_sizes: list[int],
    embedding: str,
    dim: int,
    hidden: int | None = None,
    table_names: list[str] | None = None,
    **model_options,
) -> DLRMConfig:
    """A config with one table per size, all full or all multi-layer."""
    if embedding not in EMBEDDING_KINDS:
        raise ValueError(f"embedding must be one of {EMBEDDING_KINDS}, got {embedding!r}")
    if embedding == "mlet" and hidden is None:
        raise ValueError("a multi-layer embedding needs --hidden K (the inner width)")
    if embedding == "full" and hidden is not None:
        raise ValueError("--hidden applies to multi-layer embeddings only (--embedding mlet)")
    names = table_names or [f"C{i + 1}" for i in range(len(table_sizes))]
    tables = tuple(
        TableConfig(name=name, rows=rows, dim=dim, hidden=hidden)
        for name, rows in zip(names, table_sizes, strict=True)
    )
    return DLRMConfig(num_dense=num_dense, tables=tables, **model_options)


def mlp(widths: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def bottom_mlp(config: DLRMConfig) -> nn.Sequential:
    """Dense features -> D."""
    return mlp([config.num_dense, *config.bottom_mlp, config.dim], final_activation=True)


def top_mlp(config: DLRMConfig) -> nn.Sequential:
    """The embedding and the pairwise interactions -> one logit."""
    return mlp([config.top_input_width, *config.top_mlp, 1], final_activation=False)


def build_mlps(config: DLRMConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """The bottom and the top MLP, built in that order."""
    return bottom_mlp(config), top_mlp(config)


class PairwiseDots(torch.autograd.Function):
    """vectors [B, V, D] -> the dots selected by `index` from the flattened [B, V * V] matrix.

    The dot matrix of a batch with itself is symmetric, so its gradient needs one bmm, not
    autograd's two: the selected entries' gradients, mirrored into a symmetric [V, V]
    matrix by one gather (`mirror`, from mirror_index), multiply the vectors once.
    Training spends about a sixth of a CPU step here; export writes the same arithmetic
    as plain ONNX ops (export.graph).
    """

    @staticmethod
    def forward(ctx, vectors: torch.Tensor, index: torch.Tensor, mirror: torch.Tensor):
        ctx.save_for_backward(vectors, mirror)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, V, V]
        return dots.flatten(1).index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        vectors, mirror = ctx.saved_tensors
        batch, count = vectors.shape[0], vectors.shape[1]
        with_zero = torch.cat([grad, grad.new_zeros(batch, 1)], dim=1)
        symmetric = with_zero.index_select(1, mirror).view(batch, count, count)
        return torch.bmm(symmetric, vectors), None, None


def mirror_index(index: torch.Tensor, count: int) -> torch.Tensor:
    """For each cell of a flattened [V, V] matrix, the position in `index` of it or of its
    transpose, and len(index) (a zero) for cells neither selects: a gather by this map
    turns the gradients of the selected dots into the symmetric matrix of their sum."""
    mirror = torch.full((count * count,), len(index), dtype=torch.long)
    positions = torch.arange(len(index))
    rows, cols = index // count, index % count
    mirror[index] = positions
    mirror[cols * count + rows] = positions
    return mirror


def table_key(index: int, part: str) -> str:
    """State-dict (and checkpoint) key of table `index`'s W1 (part "table", [N, K] or the
    full table [N, D]) or W2 (part "projection", nn.Linear's [D, K])."""
    return f"embeddings.tables.{index}.{part}.weight"


class DLRM(nn.Module):
    """The one network that training, export and serving share.

    `embeddings` maps ids [B, T] or [B, T, H] to [B, T, D]: by default the tables as
    `mlet.embeddings` holds them (what export and serving load); the trainer passes its
    TorchRec tables (`train.tables`) instead, and saves them under the same keys.
    """

    def __init__(
        self, config: DLRMConfig, sparse: bool = True, embeddings: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.config = config
        # built in this order, so that a seed gives the same initial weights as ever
        self.bottom = bottom_mlp(config)
        self.embeddings = embeddings or EmbeddingCollection(list(config.tables), sparse=sparse)
        self.top = top_mlp(config)
        # Strictly lower triangle of the (T+1) x (T+1) dot matrix, flattened, so that the
        # exported graph selects it with one plain Gather.
        vectors = len(config.tables) + 1
        rows, cols = torch.tril_indices(vectors, vectors, -1)
        self.register_buffer("interaction_index", rows * vectors + cols, persistent=False)
        mirror = mirror_index(self.interaction_index, vectors)
        self.register_buffer("interaction_mirror", mirror, persistent=False)

    def transform_dense(self, dense: torch.Tensor) -> torch.Tensor:
        if self.config.dense_transform == "log1p":
            return torch.log(torch.clamp(dense, min=0.0) + 1.0)
        return dense

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense [B, F] float32, sparse [B, T] or [B, T, H] int64 -> logit [B, 1]."""
        bottom = self.bottom(self.transform_dense(dense))  # [B, D]
        tables = self.embeddings(sparse)  # [B, T, D]
        vectors = torch.cat([bottom.unsqueeze(1), tables], dim=1)  # [B, T+1, D]
        if self.config.interaction == "cat":
            return self.top(vectors.flatten(1))  # [B, (T+1) D]
        pairs = PairwiseDots.apply(vectors, self.interaction_index, self.interaction_mirror)
        return self.top(torch.cat([bottom, pairs], dim=1))

    def probability(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(dense, sparse))

    def collapsed(self) -> DLRM:
        """An inference copy with every multi-layer table collapsed into one table."""
        model = DLRM(self.config.collapsed(), sparse=False)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("embeddings.")}
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            for target, table in zip(model.embeddings.tables, self.embeddings.tables, strict=True):
                target.table.weight.copy_(table.collapse())
        return model.eval()
