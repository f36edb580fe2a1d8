import pytest
import torch

from mlet.dlrm import DLRM, DLRMConfig, build_config


def test_forward_shapes_and_interaction_count():
    config = build_config(13, [5] * 26, "full", dim=8, bottom_mlp=(16,), top_mlp=(16,))
    model = DLRM(config)
    assert config.num_interactions == 27 * 26 // 2
    logits = model(torch.rand(7, 13), torch.zeros(7, 26, dtype=torch.long))
    assert logits.shape == (7, 1)
    assert model.top[0].in_features == 8 + 351
    assert model.probability(torch.rand(2, 13), torch.zeros(2, 26, dtype=torch.long)).shape == (
        2,
        1,
    )


def test_dense_transform_clamps_negatives_and_logs():
    model = DLRM(build_config(2, [3], "full", dim=2))
    out = model.transform_dense(torch.tensor([[-5.0, 0.0], [1.0, 9.0]]))
    expected = torch.log(torch.tensor([[1.0, 1.0], [2.0, 10.0]]))
    torch.testing.assert_close(out, expected)


def test_interaction_selects_each_pair_once():
    model = DLRM(build_config(1, [3, 3], "full", dim=2))
    vectors = torch.arange(3 * 2, dtype=torch.float32).view(1, 3, 2)
    dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)
    pairs = dots.index_select(1, model.interaction_index)
    # pairs (1,0), (2,0), (2,1) of vectors [0,1], [2,3], [4,5]
    assert pairs.tolist() == [[3.0, 5.0, 23.0]]


def test_pairwise_dots_gradient_equals_autograd_of_the_plain_ops():
    from mlet.dlrm import PairwiseDots

    model = DLRM(build_config(1, [3] * 5, "full", dim=4))
    torch.manual_seed(0)
    vectors = torch.randn(7, 6, 4, dtype=torch.float64, requires_grad=True)
    index = model.interaction_index
    grad = torch.randn(7, len(index), dtype=torch.float64)
    plain = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1).index_select(1, index)
    (expected,) = torch.autograd.grad(plain, vectors, grad)
    mirror = model.interaction_mirror
    fused = PairwiseDots.apply(vectors, index, mirror)
    (got,) = torch.autograd.grad(fused, vectors, grad)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda v: PairwiseDots.apply(v, index, mirror), vectors[:2])


def test_config_round_trip_and_validation():
    config = build_config(3, [4, 5], "mlet", dim=2, hidden=8)
    assert DLRMConfig.from_dict(config.to_dict()) == config
    assert config.collapsed().embedding_kind == "full"
    with pytest.raises(ValueError, match="needs --hidden"):
        build_config(3, [4], "mlet", dim=2)
    with pytest.raises(ValueError, match="multi-layer embeddings only"):
        build_config(3, [4], "full", dim=2, hidden=8)
    with pytest.raises(ValueError, match="embedding must be one of"):
        build_config(3, [4], "tt", dim=2)


def test_a_seed_initialises_bottom_mlp_then_tables_then_top_mlp():
    """Runs trained before and after a refactor start from the same weights for a seed."""
    from mlet.dlrm import bottom_mlp, top_mlp
    from mlet.embeddings import EmbeddingCollection

    config = build_config(13, [30, 5, 200], "mlet", 4, 16)
    torch.manual_seed(0)
    model = DLRM(config)
    torch.manual_seed(0)
    expected = {}
    for prefix, module in (
        ("bottom.", bottom_mlp(config)),
        ("embeddings.", EmbeddingCollection(list(config.tables))),
        ("top.", top_mlp(config)),
    ):
        expected |= {prefix + k: v for k, v in module.state_dict().items()}
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
