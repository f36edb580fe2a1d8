import numpy as np
import pytest
import torch

from mlet.data.dataset import load_dataset
from mlet.run import load_run
from tests.conftest import tiny_train_config
from train.trainer import TrainConfig, make_optimizer, train_model, train_run


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
