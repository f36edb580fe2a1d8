"""Checkpoints: renamed into place, resumed to the same weights, refused when they do not fit."""

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from cli import main
from mlet.files import read_json
from tests.conftest import tiny_train_config
from train import trainer as trainer_module
from train.checkpoint import POINTER, CheckpointError, checkpoint_path
from train.trainer import checkpoint_root, train_run

RESUMABLE = dict(epochs=3, eval_every=6, checkpoint_every=4, patience=5, embedding="mlet", hidden=8)


def weights(run) -> dict:
    return load_file(run / "model.safetensors")


def interrupt_after(monkeypatch, steps: int) -> None:
    """Make the trainer raise in its `steps`+1-th step, as a kill between steps would."""
    original, count = trainer_module.Trainer.train_step, [0]

    def step(self, batch):
        count[0] += 1
        if count[0] > steps:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    config = tiny_train_config(**RESUMABLE)
    whole = train_run(tiny_data, tmp_path / "whole", config)
    interrupt_after(monkeypatch, 17)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_data, tmp_path / "cut", config)
    assert not (tmp_path / "cut").exists()
    latest = checkpoint_path(checkpoint_root(tmp_path / "cut"))
    assert latest.name == "step-000000016"  # the last checkpoint before step 18
    monkeypatch.undo()
    resumed = train_run(tiny_data, tmp_path / "cut", config, resume=True)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    def scores(history):
        return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]

    assert scores(resumed.metrics["history"]) == scores(whole.metrics["history"])
    assert resumed.metrics["test"] == whole.metrics["test"]
    assert not checkpoint_root(tmp_path / "cut").exists()


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(tiny_data, tmp_path):
    """kill -9 at an arbitrary moment, checkpoints every step: resume, same final weights."""
    args = ["--embedding", "mlet", "--dim", "4", "--hidden", "8", "--bottom-mlp", "8",
            "--top-mlp", "8", "--epochs", "4", "--batch-size", "256", "--patience", "9",
            "--checkpoint-every", "1"]  # fmt: skip
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "whole"), *args]) == 0
    run = tmp_path / "killed"
    root = checkpoint_root(run)
    command = [sys.executable, "-m", "cli", "train", "--data", str(tiny_data), "--out", str(run)]
    process = subprocess.Popen([*command, *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            pointer = root / POINTER
            if pointer.is_file() and read_json(pointer).get("latest", "") >= "step-000000020":
                break
            time.sleep(0.005)
        assert process.poll() is None, "training ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not run.exists()
    latest = checkpoint_path(root)  # complete: trainer.json and DCP metadata present
    assert latest.name >= "step-000000020"
    assert main(["train", "--resume", str(run)]) == 0
    a, b = weights(tmp_path / "whole"), weights(run)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def interrupted(tiny_data, tmp_path, monkeypatch, **options):
    run = tmp_path / "cut"
    interrupt_after(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_data, run, tiny_train_config(**RESUMABLE, **options))
    monkeypatch.undo()
    return run


def test_resume_refuses_another_config_or_dataset(tiny_data, tmp_path, monkeypatch):
    run = interrupted(tiny_data, tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match="different run: its train differs.*hidden"):
        train_run(tiny_data, run, tiny_train_config(**{**RESUMABLE, "hidden": 16}), resume=True)
    with pytest.raises(SystemExit, match="started with --hidden 8, not 16"):
        main(["train", "--resume", str(run), "--hidden", "16"])
    with pytest.raises(SystemExit, match="trains on"):
        main(["train", "--resume", str(run), "--data", str(tmp_path)])
    with pytest.raises(FileExistsError, match="--resume"):
        train_run(tiny_data, run, tiny_train_config(**RESUMABLE))  # would drop the checkpoints
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_run(tiny_data, tmp_path / "never", tiny_train_config(), resume=True)


def test_resume_may_extend_training(tiny_data, tmp_path, monkeypatch):
    run = interrupted(tiny_data, tmp_path, monkeypatch)
    assert main(["train", "--resume", str(run), "--epochs", "4"]) == 0
    assert read_json(run / "metrics.json")["epochs_run"] == 4


def test_corrupt_or_partial_checkpoints_are_refused(tiny_data, tmp_path, monkeypatch):
    run = interrupted(tiny_data, tmp_path, monkeypatch)
    root = checkpoint_root(run)
    latest = checkpoint_path(root)
    (latest / ".metadata").rename(latest / "moved")
    with pytest.raises(CheckpointError, match="incomplete"):
        train_run(tiny_data, run, tiny_train_config(**RESUMABLE), resume=True)
    (latest / "moved").write_bytes(pickle.dumps(os.system))  # a pickle that would run code
    (latest / "moved").rename(latest / ".metadata")
    with pytest.raises(CheckpointError, match="refers to .*system"):
        train_run(tiny_data, run, tiny_train_config(**RESUMABLE), resume=True)
    (latest / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="unreadable DCP metadata"):
        train_run(tiny_data, run, tiny_train_config(**RESUMABLE), resume=True)
    assert not run.exists()


def test_a_truncated_tensor_file_is_refused(tiny_data, tmp_path, monkeypatch):
    run = interrupted(tiny_data, tmp_path, monkeypatch)
    latest = checkpoint_path(checkpoint_root(run))
    biggest = max(latest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not be read"):
        train_run(tiny_data, run, tiny_train_config(**RESUMABLE), resume=True)
