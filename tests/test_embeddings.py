import pytest
import torch

from mlet.dlrm import DLRM, build_config
from mlet.embeddings import (
    EmbeddingCollection,
    FullEmbedding,
    MultiLayerEmbedding,
    TableConfig,
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


def test_collection_keeps_the_checkpoint_keys():
    configs = [TableConfig(f"C{i}", rows=r, dim=2, hidden=4) for i, r in enumerate([3, 9])]
    assert list(EmbeddingCollection(configs).state_dict()) == [
        "tables.0.table.weight",
        "tables.0.projection.weight",
        "tables.1.table.weight",
        "tables.1.projection.weight",
    ]
