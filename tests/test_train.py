"""Training on TorchRec: the run folder, the model it rebuilds, stopping and schedules."""

import numpy as np
import pytest
import torch

from mlet.dataset import load_dataset, split_rows
from mlet.embeddings import TableConfig
from mlet.run import load_run
from tests.conftest import tiny_train_config
from train.tables import bag_config, rowwise_lr_factor, stored_width
from train.trainer import TrainConfig, lr_scale, predict_rows, train_model, train_run


def test_run_folder_holds_config_weights_and_metrics(tiny_runs):
    run = load_run(tiny_runs["mlet"])
    assert run.model_config.embedding_kind == "mlet"
    assert run.config["train"]["hidden"] == 16
    assert run.config["train"]["optimizer"] == "rwsadagrad"
    assert set(run.config["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for split in ("val", "test"):
        assert set(run.metrics[split]) == {"auc", "logloss", "accuracy"}
        assert 0.0 <= run.metrics[split]["auc"] <= 1.0
    assert run.metrics["device"] == "cpu" and run.metrics["processes"] == 1
    assert set(run.metrics["sharding"]) == {f"C{i + 1}" for i in range(5)}
    assert run.metrics["epochs_run"] == len(run.metrics["history"]) == 1
    # checkpoints are removed once the run is complete
    assert not (tiny_runs["mlet"].parent / "mlet.checkpoints").exists()


@pytest.mark.parametrize("embedding, hidden, dim", [("full", None, 2), ("mlet", 6, 4)])
def test_saved_weights_rebuild_the_same_model(tiny_data, tmp_path, embedding, hidden, dim):
    """The plain DLRM loaded from the run scores test rows as the sharded model did.

    Widths that are not multiples of 4 are padded inside TorchRec and cut when saved.
    """
    config = tiny_train_config(embedding=embedding, hidden=hidden, dim=dim)
    result = train_run(tiny_data, tmp_path / "r", config)
    model = load_run(tmp_path / "r").load_model()
    assert model.embeddings.tables[0].table.weight.shape[1] == (hidden or dim)  # W1 kept
    dataset = load_dataset(tiny_data)
    test = split_rows(len(dataset)).test
    again = predict_rows(model, dataset, test, 1000, torch.device("cpu"))
    np.testing.assert_allclose(again, result.test_probabilities, rtol=0, atol=1e-6)


def test_training_is_deterministic_from_the_seed(tiny_data):
    dataset = load_dataset(tiny_data)
    a = train_model(dataset, tiny_train_config(seed=5))
    b = train_model(dataset, tiny_train_config(seed=5))
    c = train_model(dataset, tiny_train_config(seed=6))
    assert a.metrics["test"] == b.metrics["test"] != c.metrics["test"]


@pytest.mark.parametrize("optimizer", ["rwsadagrad", "adagrad"])
def test_training_learns_something(tiny_data, optimizer):
    config = tiny_train_config(epochs=3, lr=0.05, optimizer=optimizer, patience=3)
    result = train_model(load_dataset(tiny_data), config)
    assert result.metrics["test"]["auc"] > 0.6


def test_sgd_lowers_the_validation_loss(tiny_data):
    config = tiny_train_config(epochs=3, lr=1.0, optimizer="sgd", patience=3)
    history = train_model(load_dataset(tiny_data), config).metrics["history"]
    assert history[-1]["val_logloss"] < history[0]["val_logloss"]


def test_only_the_rows_a_batch_touches_change(tiny_data):
    """The fused row-wise update leaves rows no batch looked up as they were initialised."""
    dataset = load_dataset(tiny_data)
    train = split_rows(len(dataset)).train
    seen = np.unique(np.asarray(dataset.sparse[train.start : train.stop, 2]))
    config = tiny_train_config(epochs=1, max_steps_per_epoch=1, batch_size=8)
    trained = train_model(dataset, config).model.embeddings.tables[2].table.weight
    bound = (1 / 120) ** 0.5
    untouched = np.setdiff1d(np.arange(120), seen)
    # one batch of 8 rows touches at most 8 of the 120 rows; all others keep their init
    changed = (trained.abs() > bound + 1e-7).any(dim=1).nonzero().ravel().tolist()
    assert len(changed) <= 8 and not set(changed) & set(untouched.tolist())


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
        (dict(optimizer="adamw"), "optimizer must be one of"),
        (dict(stop_on="accuracy"), "stop_on must be one of"),
        (dict(sharding="grid"), "sharding must be one of"),
        (dict(dim=0), "dim must be positive"),
        (dict(eval_every=0), "eval_every must be positive"),
        (dict(lr=-1.0), "learning rates must be positive"),
        (dict(lr_warmup_steps=10, lr_decay_start=5, lr_decay_steps=5), "before the end of"),
        (dict(table_init="xavier"), "table_init must be one of"),
    ],
)
def test_bad_train_config_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_adam_needs_cuda(tiny_data):
    with pytest.raises(ValueError, match="adam needs CUDA"):
        train_model(load_dataset(tiny_data), tiny_train_config(optimizer="adam", device="cpu"))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sharding="row"), "does not shard row_wise on cpu"),
        (dict(sharding="column", dim=4), "multiples of 8"),
    ],
)
def test_impossible_sharding_is_refused(tiny_data, options, message):
    with pytest.raises(ValueError, match=message):
        train_model(load_dataset(tiny_data), tiny_train_config(**options))


def test_sharding_can_be_chosen(tiny_data):
    result = train_model(load_dataset(tiny_data), tiny_train_config(sharding="column", dim=8))
    assert set(result.metrics["sharding"].values()) == {"column_wise"}


def test_predictions_cover_every_row(tiny_data):
    result = train_model(load_dataset(tiny_data), tiny_train_config())
    assert sum(result.metrics["split_rows"].values()) == 4000
    assert result.test_probabilities.shape == (400,)
    assert ((result.test_probabilities > 0) & (result.test_probabilities < 1)).all()


def test_normal_table_initialisation_is_the_contrast():
    table = TableConfig("C1", rows=120, dim=4)
    weight = torch.empty(120, 4)
    bag_config(table, normal_std=1.0).init_fn(weight)
    assert 0.8 < weight.std().item() < 1.2
    bag_config(table, normal_std=None).init_fn(weight)
    assert weight.abs().max() <= (1 / 120) ** 0.5


def test_padded_widths_keep_the_rowwise_step():
    tables = [TableConfig("C1", rows=5, dim=2), TableConfig("C2", rows=5, dim=2)]
    assert stored_width(tables[0]) == 4
    assert rowwise_lr_factor(tables) == pytest.approx(0.5**0.5)
    assert rowwise_lr_factor([TableConfig("C1", rows=5, dim=3, hidden=8)]) == 1.0


def test_learning_rate_schedule_is_dlrms():
    config = TrainConfig(lr_warmup_steps=4, lr_decay_start=10, lr_decay_steps=5)
    assert [lr_scale(s, config) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_scale(10, config) == 1.0
    assert lr_scale(12, config) == pytest.approx((3 / 5) ** 2)
    assert lr_scale(15, config) == lr_scale(99, config) == 0.0
    assert lr_scale(123, TrainConfig()) == 1.0  # off by default


def test_validation_inside_epochs_and_early_stopping(tiny_data):
    config = tiny_train_config(epochs=4, eval_every=5, patience=2, lr=0.5, optimizer="sgd")
    result = train_model(load_dataset(tiny_data), config)
    history = result.metrics["history"]
    steps = [h["step"] for h in history]
    assert steps[:3] == [5, 10, 13]  # every 5 steps and at the end of the 13-step epoch
    best = min(history, key=lambda h: h["val_logloss"])
    assert result.metrics["best_step"] == best["step"]
    assert result.metrics["val"]["logloss"] == best["val_logloss"]
    assert result.metrics["stop_on"] == "logloss"
    by_auc = train_model(load_dataset(tiny_data), tiny_train_config(epochs=2, stop_on="auc"))
    best = max(by_auc.metrics["history"], key=lambda h: h["val_auc"])
    assert by_auc.metrics["best_step"] == best["step"]


def _plain_copy(sharded, model_config, path):
    """A plain DLRM holding the sharded model's current weights, through the trainer's save."""
    from safetensors.torch import load_file

    from mlet.dlrm import DLRM
    from train.saving import write_weights

    write_weights(sharded, model_config, path, rank=0)
    plain = DLRM(model_config)
    plain.load_state_dict(load_file(path))
    return plain


@pytest.mark.parametrize("embedding,hidden", [("full", None), ("mlet", 8)])
def test_fused_adagrad_takes_torchs_adagrad_steps(embedding, hidden, tmp_path):
    """FBGEMM's table update is torch.optim.Adagrad's, epsilon included: tiny gradients
    (a batch-mean loss gives a table row little) are where a larger epsilon slows tables."""
    from mlet.dlrm import build_config
    from train.distributed import shard_model, start_processes
    from train.trainer import build_model

    sizes = [50, 70, 30]
    model_config = build_config(
        num_dense=3, table_sizes=sizes, table_names=["a", "b", "c"], embedding=embedding,
        dim=4, hidden=hidden, bottom_mlp=(8,), top_mlp=(8, 4), interaction="dot",
        dense_transform="log1p", hotness=1,
    )  # fmt: skip
    config = TrainConfig(embedding=embedding, dim=4, hidden=hidden, optimizer="adagrad",
                         device="cpu")  # fmt: skip
    model = build_model(model_config, config)
    sharded, optimizer, _ = shard_model(model, model.embeddings, config, start_processes("cpu"))
    plain = _plain_copy(sharded, model_config, tmp_path / "before.safetensors")
    reference = torch.optim.Adagrad(plain.parameters(), lr=config.lr)
    loss = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        dense = torch.rand(64, 3, generator=generator)
        sparse = torch.stack([torch.randint(0, n, (64,), generator=generator) for n in sizes], 1)
        labels = (torch.rand(64, generator=generator) < 0.3).float()
        for net, opt in ((sharded, optimizer), (plain, reference)):
            opt.zero_grad()
            loss(net(dense, sparse).squeeze(1), labels).backward()
            opt.step()
    after = _plain_copy(sharded, model_config, tmp_path / "after.safetensors").state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-5, msg=key)
