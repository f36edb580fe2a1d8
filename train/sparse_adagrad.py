"""Adagrad for embedding tables with row-sparse gradients, in a few dense index operations.

The same update as torch.optim.Adagrad (no weight decay, no lr decay, initial accumulator
0): for each touched row r, sum[r] += g[r]^2 and w[r] -= lr * g[r] / (sqrt(sum[r]) + eps).
torch's sparse path builds several sparse tensors per table and step (coalesce, pow,
sparse_mask, division); on CPU with many small tables that bookkeeping, not the
arithmetic, is most of a training step. Here each table's step is a handful of
index_select / index_add_ calls on the touched rows only, and the coalesce (a sort and a
copy of the values) is skipped when the gradient already holds each row once in
ascending order, as the grouped lookup of `mlet.embeddings.EmbeddingCollection` gives it.
"""

from __future__ import annotations

import torch


class RowSparseAdagrad(torch.optim.Optimizer):
    """Adagrad over parameters whose gradients are sparse along the first dimension."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-10) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group["lr"], group["eps"])
        return loss

    def _update(self, param: torch.Tensor, lr: float, eps: float) -> None:
        state = self.state[param]
        if "sum" not in state:
            state["sum"] = torch.zeros_like(param)
        grad = param.grad
        if not grad.is_sparse:
            state["sum"].addcmul_(grad, grad)
            param.addcdiv_(grad, state["sum"].sqrt().add_(eps), value=-lr)
            return
        rows, values = distinct_rows(grad)  # [U], [U, D]
        sums = state["sum"].index_select(0, rows).addcmul_(values, values)
        state["sum"].index_copy_(0, rows, sums)
        param.index_add_(0, rows, values / sums.sqrt_().add_(eps), alpha=-lr)


def distinct_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-sparse gradient's rows [U] and values [U, ...], each row once (summed)."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"expected a gradient sparse along rows only, got {grad.sparse_dim()} sparse dims"
        )
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        # Strictly ascending rows are already coalesced; checking costs three small ops
        # where coalesce() sorts and copies. Anything else (duplicates, any order) is
        # coalesced, so the check decides speed, never the result.
        if not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()
    return grad._indices()[0], grad._values()


class Optimizers:
    """Several optimizers stepped as one (tables and the dense rest).

    Only what training here uses: zero_grad, step and the optimizers' param_groups in
    order (the tables' first). It is not a torch.optim.Optimizer: no state_dict, no
    learning-rate schedulers.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]


def table_and_dense_parameters(
    model: torch.nn.Module,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The embedding tables' weights (sparse gradients) and every other parameter."""
    tables = [p for n, p in model.named_parameters() if n.endswith("table.weight")]
    table_ids = {id(p) for p in tables}
    return tables, [p for p in model.parameters() if id(p) not in table_ids]
