import pytest
import torch

from mlet.dlrm import DLRM, build_config
from mlet.embeddings import (
    EmbeddingCollection,
    FullEmbedding,
    MultiLayerEmbedding,
    TableConfig,
    _distinct,
)


def test_collapse_equals_two_layer_lookup_single_hot():
    torch.manual_seed(0)
    table = MultiLayerEmbedding(TableConfig("C1", rows=37, dim=3, hidden=11))
    ids = torch.tensor([0, 5, 36, 5])
    collapsed = table.collapse()
    assert collapsed.shape == (37, 3) and collapsed.dtype == torch.float32
    torch.testing.assert_close(collapsed[ids], table(ids), rtol=0, atol=1e-6)


def test_collapse_is_computed_in_float64():
    table = MultiLayerEmbedding(TableConfig("C1", rows=5, dim=2, hidden=4))
    expected = (table.table.weight.double() @ table.projection.weight.double().T).float()
    assert torch.equal(table.collapse(), expected)


def test_collapse_in_row_blocks_matches_whole():
    table = MultiLayerEmbedding(TableConfig("C1", rows=100, dim=4, hidden=8))
    assert torch.equal(table.collapse(block_rows=7), table.collapse())


def test_multi_hot_sums_vectors_and_collapses_exactly():
    torch.manual_seed(1)
    table = MultiLayerEmbedding(TableConfig("C1", rows=20, dim=4, hidden=9))
    ids = torch.tensor([[1, 2, 3], [4, 4, 19]])  # [B, H]
    pooled = table(ids)
    assert pooled.shape == (2, 4)
    collapsed = table.collapse()
    torch.testing.assert_close(collapsed[ids].sum(1), pooled, rtol=0, atol=1e-6)


def test_full_table_collapse_is_its_weight():
    table = FullEmbedding(TableConfig("C1", rows=10, dim=3))
    assert torch.equal(table.collapse(), table.table.weight.detach())
    assert table(torch.tensor([[1, 2]])).shape == (1, 3)


def test_paper_initialisation_ranges():
    table = MultiLayerEmbedding(TableConfig("C1", rows=400, dim=4, hidden=64))
    assert table.table.weight.abs().max() <= (1 / 400) ** 0.5
    assert 0.2 < table.projection.weight.std().item() < 0.3


@pytest.mark.parametrize(
    "kwargs", [dict(rows=0, dim=4), dict(rows=5, dim=0), dict(rows=5, dim=4, hidden=0)]
)
def test_table_config_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="must be positive"):
        TableConfig("C1", **kwargs)


@pytest.mark.parametrize("hotness", [1, 3])
def test_collapsed_dlrm_matches_trained_model(hotness):
    torch.manual_seed(2)
    config = build_config(4, [10, 20, 30], "mlet", dim=4, hidden=12, hotness=hotness)
    model = DLRM(config).eval()
    dense = torch.rand(6, 4) * 10
    shape = (6, 3) if hotness == 1 else (6, 3, hotness)
    sparse = (
        torch.rand(shape) * torch.tensor([10, 20, 30]).view(1, 3, *[1] * (hotness > 1))
    ).long()
    collapsed = model.collapsed()
    assert collapsed.config.embedding_kind == "full"
    torch.testing.assert_close(collapsed(dense, sparse), model(dense, sparse), rtol=0, atol=1e-5)


def _grouped_and_per_table(configs, ids):
    """Outputs and gradients in training: the collection's grouped path, then each table's
    own forward (an MLET table's own row dedup, a full table's plain lookup)."""
    torch.manual_seed(3)
    collection = EmbeddingCollection(configs).train()
    weights = torch.randn(*ids.shape[:2], configs[0].dim)  # a loss with gradients near 1
    forwards = (
        collection,
        lambda ids: torch.stack([t(ids[:, i]) for i, t in enumerate(collection.tables)], 1),
    )
    results = []
    for forward in forwards:
        collection.zero_grad(set_to_none=True)
        out = forward(ids)
        (out * weights).sum().backward()
        grads = {n: p.grad.to_dense().clone() for n, p in collection.named_parameters()}
        results.append((out.detach(), grads))
    return collection, results


@pytest.mark.parametrize("hotness", [1, 3])
@pytest.mark.parametrize(
    "hidden",
    [(12, 12, 12, 12), (8, 16, 12, 5), (None, None, None, None), (8, None, 12, None)],
    ids=["mlet", "mlet mixed k", "full", "full and mlet"],
)
def test_grouped_distinct_row_forward_is_the_per_table_function_and_gradient(hotness, hidden):
    sizes = [5, 40, 1, 17]
    configs = [
        TableConfig(f"C{i}", rows=r, dim=3, hidden=k)
        for i, (r, k) in enumerate(zip(sizes, hidden, strict=True))
    ]
    shape = (64, 4) if hotness == 1 else (64, 4, hotness)
    ids = (torch.rand(shape) * torch.tensor(sizes).view(1, 4, *[1] * (hotness > 1))).long()
    collection, [(grouped, grouped_grads), (plain, plain_grads)] = _grouped_and_per_table(
        configs, ids
    )
    assert collection._deduplicates_together()
    assert grouped.shape == (64, 4, 3)
    torch.testing.assert_close(grouped, plain, rtol=0, atol=1e-6)
    assert grouped_grads.keys() == plain_grads.keys()
    for name, grad in grouped_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-6)
    # the grouped path touches only the rows the batch holds, as a sparse gradient
    assert collection.tables[1].table.weight.grad.is_sparse


def test_grouped_forward_keeps_the_checkpoint_keys():
    configs = [TableConfig(f"C{i}", rows=r, dim=2, hidden=4) for i, r in enumerate([3, 9])]
    assert list(EmbeddingCollection(configs).state_dict()) == [
        "tables.0.table.weight",
        "tables.0.projection.weight",
        "tables.1.table.weight",
        "tables.1.projection.weight",
    ]


def test_grouped_lookup_gives_each_table_its_rows_once_in_order():
    configs = [TableConfig("C1", rows=9, dim=3, hidden=6), TableConfig("C2", rows=4, dim=3)]
    collection = EmbeddingCollection(configs).train()
    ids = torch.tensor([[8, 3], [0, 1], [8, 3], [2, 3]])
    collection(ids).sum().backward()
    for table, expected in zip(collection.tables, ([0, 2, 8], [1, 3]), strict=True):
        grad = table.table.weight.grad
        assert grad.is_sparse and grad._indices()[0].tolist() == expected


def test_mixed_dims_go_table_by_table():
    configs = [TableConfig("C1", rows=9, dim=3, hidden=6), TableConfig("C2", rows=4, dim=2)]
    collection = EmbeddingCollection(configs).train()
    assert not collection._deduplicates_together()
    with pytest.raises(RuntimeError):  # no [B, T, D] with two widths
        collection(torch.tensor([[0, 1], [8, 3], [0, 3]]))


def test_tables_without_row_dedup_go_table_by_table():
    configs = [TableConfig("C1", rows=9, dim=3), TableConfig("C2", rows=4, dim=3)]
    collection = EmbeddingCollection(configs).train()
    collection.tables[0].deduplicate_rows = False
    assert not collection._deduplicates_together()
    ids = torch.tensor([[8, 3], [8, 3]])
    collection(ids).sum().backward()
    assert collection.tables[0].table.weight.grad._indices()[0].tolist() == [8, 8]


@pytest.mark.parametrize("rows", [50, 10_000])  # mask below 2x the ids, unique() above
def test_distinct_matches_torch_unique(rows):
    ids = torch.randint(0, rows, (40, 3))
    unique, inverse = _distinct(ids, rows)
    expected_unique, expected_inverse = torch.unique(ids, return_inverse=True)
    assert torch.equal(unique, expected_unique) and torch.equal(inverse, expected_inverse)


@pytest.mark.parametrize("bad_id", [4, -1])
def test_grouped_lookup_refuses_an_id_outside_its_table(bad_id):
    configs = [TableConfig("C1", rows=9, dim=3), TableConfig("C2", rows=4, dim=3, hidden=5)]
    collection = EmbeddingCollection(configs).train()
    ids = torch.tensor([[8, 3], [0, bad_id]])  # 4 would be row 0 of the next table's space
    with pytest.raises(IndexError, match=rf"table C2: ids must lie in \[0, 4\), got {bad_id}"):
        collection(ids)
