import numpy as np
import pytest
import torch

from mlet.dataset import load_dataset
from mlet.embeddings import MultiLayerEmbedding, TableConfig
from mlet.run import load_run
from tests.conftest import tiny_train_config
from train.sparse_adagrad import distinct_rows, table_and_dense_parameters
from train.trainer import TrainConfig, build_model, make_optimizer, train_model, train_run


def test_run_folder_holds_config_weights_and_metrics(tiny_runs):
    run = load_run(tiny_runs["mlet"])
    assert run.model_config.embedding_kind == "mlet"
    assert run.config["train"]["hidden"] == 16
    assert set(run.config["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for split in ("val", "test"):
        assert set(run.metrics[split]) == {"auc", "logloss", "accuracy"}
        assert 0.0 <= run.metrics[split]["auc"] <= 1.0
    assert run.metrics["device"] == "cpu"
    assert run.metrics["epochs_run"] == len(run.metrics["history"]) == 1


def test_saved_weights_rebuild_the_same_model(tiny_data, tmp_path):
    result = train_run(tiny_data, tmp_path / "r", tiny_train_config(embedding="mlet", hidden=8))
    reloaded = load_run(tmp_path / "r").load_model()
    dense = torch.rand(5, 13)
    sparse = torch.zeros(5, 5, dtype=torch.long)
    trained = result.model.eval()
    torch.testing.assert_close(reloaded(dense, sparse), trained(dense, sparse), rtol=0, atol=0)
    assert reloaded.embeddings.tables[0].table.weight.shape[1] == 8  # W1 kept uncollapsed


def test_training_is_deterministic_from_the_seed(tiny_data):
    dataset = load_dataset(tiny_data)
    a = train_model(dataset, tiny_train_config(seed=5))
    b = train_model(dataset, tiny_train_config(seed=5))
    assert a.metrics["test"] == b.metrics["test"]


def test_training_learns_something(tiny_data):
    result = train_model(load_dataset(tiny_data), tiny_train_config(epochs=3, lr=0.05))
    assert result.metrics["test"]["auc"] > 0.6


def test_tables_get_sparse_gradients_and_only_touched_rows_change(tiny_data):
    dataset = load_dataset(tiny_data)
    result = train_model(dataset, tiny_train_config(epochs=1, max_steps_per_epoch=1, batch_size=8))
    model = result.model
    grads = model.embeddings.tables[2].table.weight  # 120-row table
    assert grads.shape[0] == 120
    optimizer = make_optimizer(model.train(), TrainConfig())
    assert len(optimizer.param_groups) == 2
    before = grads.detach().clone()
    ids = torch.tensor([[0, 0, 5, 0, 0]])
    loss = model(torch.rand(1, 13), ids).sum()
    optimizer.zero_grad()
    loss.backward()
    assert grads.grad.is_sparse
    optimizer.step()
    changed = (grads.detach() != before).any(dim=1).nonzero().ravel().tolist()
    assert changed == [5]


def test_existing_run_is_kept_unless_overwrite(tiny_data, tmp_path):
    train_run(tiny_data, tmp_path / "r", tiny_train_config())
    stamp = (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_run(tiny_data, tmp_path / "r", tiny_train_config())
    assert (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns == stamp
    train_run(tiny_data, tmp_path / "r", tiny_train_config(seed=1), overwrite=True)
    assert load_run(tmp_path / "r").config["seed"] == 1


def test_failed_training_leaves_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        train_run(tmp_path / "missing", tmp_path / "r", tiny_train_config())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(optimizer="adam"), "optimizer must be one of"),
        (dict(dim=0), "dim must be positive"),
        (dict(lr=-1.0), "learning rates must be positive"),
    ],
)
def test_bad_train_config_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_predictions_cover_every_row(tiny_data):
    result = train_model(load_dataset(tiny_data), tiny_train_config())
    assert sum(result.metrics["split_rows"].values()) == 4000
    assert np.isfinite(result.metrics["test"]["logloss"])


def train_steps(model, config, batches):
    optimizer = make_optimizer(model, config)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for dense, sparse, labels in batches:
        loss = loss_fn(model(dense, sparse).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
@pytest.mark.parametrize("embedding, hidden", [("full", None), ("mlet", 16)])
def test_sparse_updates_equal_dense_updates(tiny_data, optimizer, embedding, hidden):
    dataset = load_dataset(tiny_data)
    options = dict(embedding=embedding, hidden=hidden, optimizer=optimizer, lr=0.05)
    sparse_config = tiny_train_config(**options)
    dense_config = tiny_train_config(**options, sparse=False)
    torch.manual_seed(0)
    sparse_model = build_model(dataset, sparse_config)
    dense_model = build_model(dataset, dense_config)
    dense_model.load_state_dict(sparse_model.state_dict())
    initial = {k: v.clone() for k, v in sparse_model.state_dict().items()}
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        index = rng.integers(0, 3000, 32)
        batches.append(
            (
                torch.from_numpy(np.asarray(dataset.dense[index])),
                torch.from_numpy(np.asarray(dataset.sparse[index], dtype=np.int64)),
                torch.from_numpy(np.asarray(dataset.labels[index], dtype=np.float32)),
            )
        )
    train_steps(sparse_model.train(), sparse_config, batches)
    train_steps(dense_model.train(), dense_config, batches)
    assert sparse_model.embeddings.tables[2].table.weight.grad.is_sparse
    assert not dense_model.embeddings.tables[2].table.weight.grad.is_sparse
    for name, value in sparse_model.state_dict().items():
        torch.testing.assert_close(value, dense_model.state_dict()[name], rtol=1e-5, atol=1e-6)
    # rows no batch touched keep their initial values in both
    touched = torch.cat([b[1][:, 2] for b in batches]).unique()
    untouched = torch.ones(120, dtype=torch.bool)
    untouched[touched] = False
    weight = sparse_model.embeddings.tables[2].table.weight.detach()
    assert untouched.any()
    assert torch.equal(weight[untouched], initial["embeddings.tables.2.table.weight"][untouched])
    assert not torch.equal(weight[touched], initial["embeddings.tables.2.table.weight"][touched])


def test_mlet_distinct_row_forward_is_the_same_function_and_gradient():
    torch.manual_seed(0)
    table = MultiLayerEmbedding(TableConfig("C1", rows=30, dim=3, hidden=8))
    ids = torch.tensor([[4, 4, 7], [7, 29, 4]])  # repeated ids, multi-hot
    table.train()
    deduplicated = table(ids)
    deduplicated.square().sum().backward()
    grad_dedup = table.table.weight.grad.to_dense().clone()
    projection_dedup = table.projection.weight.grad.clone()
    table.zero_grad()
    table.deduplicate_rows = False
    plain = table(ids)
    plain.square().sum().backward()
    torch.testing.assert_close(deduplicated, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_dedup, table.table.weight.grad.to_dense(), rtol=0, atol=1e-6)
    torch.testing.assert_close(projection_dedup, table.projection.weight.grad, rtol=0, atol=1e-6)


def test_normal_table_initialisation_is_the_contrast(tiny_data):
    dataset = load_dataset(tiny_data)
    torch.manual_seed(0)
    paper = build_model(dataset, tiny_train_config())
    normal = build_model(dataset, tiny_train_config(table_init="normal", table_init_std=1.0))
    big = normal.embeddings.tables[2].table.weight  # 120 rows
    assert 0.8 < big.std().item() < 1.2
    assert paper.embeddings.tables[2].table.weight.abs().max() <= (1 / 120) ** 0.5
    with pytest.raises(ValueError, match="table_init must be one of"):
        TrainConfig(table_init="xavier")


def test_train_result_keeps_test_probabilities(tiny_data):
    result = train_model(load_dataset(tiny_data), tiny_train_config())
    assert result.test_probabilities.shape == (400,)
    assert ((result.test_probabilities > 0) & (result.test_probabilities < 1)).all()


@pytest.mark.parametrize("embedding, hidden", [("full", None), ("mlet", 16)])
def test_row_sparse_adagrad_matches_torch_adagrad(tiny_data, embedding, hidden):
    dataset = load_dataset(tiny_data)
    config = tiny_train_config(embedding=embedding, hidden=hidden, lr=0.05)
    torch.manual_seed(0)
    fast = build_model(dataset, config)
    reference = build_model(dataset, config)
    reference.load_state_dict(fast.state_dict())
    for table in reference.embeddings.tables:  # torch's coalescing path, table by table
        table.deduplicate_rows = False
    rng = np.random.default_rng(1)
    index = [rng.integers(0, 3000, 32) for _ in range(5)]
    batches = [
        (
            torch.from_numpy(np.asarray(dataset.dense[i])),
            torch.from_numpy(np.asarray(dataset.sparse[i], dtype=np.int64)),
            torch.from_numpy(np.asarray(dataset.labels[i], dtype=np.float32)),
        )
        for i in index
    ]
    train_steps(fast.train(), config, batches)
    tables, rest = table_and_dense_parameters(reference)
    torch_adagrad = torch.optim.Adagrad([{"params": tables}, {"params": rest}], lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for dense, sparse, labels in batches:
        loss = loss_fn(reference.train()(dense, sparse).squeeze(1), labels)
        torch_adagrad.zero_grad()
        loss.backward()
        torch_adagrad.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rows",
    [[1, 4, 7], [7, 1, 4], [1, 4, 4, 7], [3]],
    ids=["ascending", "any order", "repeat", "one"],
)
def test_distinct_rows_sums_each_row_once(rows):
    values = torch.arange(len(rows) * 2, dtype=torch.float32).view(-1, 2)
    grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (9, 2))
    found, summed = distinct_rows(grad)
    expected = grad.coalesce()
    assert torch.equal(found, expected.indices()[0]) and torch.equal(summed, expected.values())
    # ascending rows are used as they are, without the copy coalesce() makes
    ascending = rows == sorted(set(rows))
    assert (summed.data_ptr() == grad._values().data_ptr()) == ascending


def test_distinct_rows_takes_empty_and_coalesced_gradients():
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 2), (9, 2))
    rows, values = distinct_rows(empty)
    assert rows.numel() == 0 and values.shape == (0, 2)
    coalesced = torch.sparse_coo_tensor(torch.tensor([[5, 1]]), torch.ones(2, 2), (9, 2)).coalesce()
    assert distinct_rows(coalesced)[0].tolist() == [1, 5]
    with pytest.raises(ValueError, match="sparse along rows only"):
        distinct_rows(torch.eye(3).to_sparse())


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_tables_get_their_own_learning_rate(tiny_data, optimizer):
    model = build_model(load_dataset(tiny_data), tiny_train_config())
    config = TrainConfig(optimizer=optimizer, lr=0.01, embedding_lr=0.2)
    tables, rest = make_optimizer(model, config).param_groups
    assert (tables["lr"], rest["lr"]) == (0.2, 0.01)
    assert all(p.ndim == 2 and p.shape[0] >= 1 for p in tables["params"])
    assert len(tables["params"]) == len(model.embeddings.tables)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_foreach_dense_group_gives_the_same_numbers(tiny_data, optimizer):
    dataset = load_dataset(tiny_data)
    config = tiny_train_config(embedding="mlet", hidden=8, optimizer=optimizer, lr=0.05)
    torch.manual_seed(0)
    models = [build_model(dataset, config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    index = [np.random.default_rng(i).integers(0, 3000, 32) for i in range(4)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for model, foreach in zip(models, (True, False), strict=True):
        updates = make_optimizer(model.train(), config)
        assert updates.param_groups[1]["foreach"] is True
        updates.param_groups[1]["foreach"] = foreach
        for i in index:
            dense = torch.from_numpy(np.asarray(dataset.dense[i]))
            sparse = torch.from_numpy(np.asarray(dataset.sparse[i], dtype=np.int64))
            labels = torch.from_numpy(np.asarray(dataset.labels[i], dtype=np.float32))
            loss = loss_fn(model(dense, sparse).squeeze(1), labels)
            updates.zero_grad()
            loss.backward()
            updates.step()
    for name, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name]), name
