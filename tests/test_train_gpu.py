"""TorchRec training on CUDA (fbgemm-gpu): the same trainer, tables on the GPU."""

import pytest
import torch

from mlet.dataset import load_dataset
from tests.conftest import tiny_train_config
from train.trainer import train_model

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("optimizer", ["rwsadagrad", "adam"])
def test_training_on_cuda_learns(tiny_data, optimizer):
    config = tiny_train_config(epochs=3, lr=0.05, optimizer=optimizer, device="cuda",
                               embedding="mlet", hidden=16, patience=3)  # fmt: skip
    result = train_model(load_dataset(tiny_data), config)
    assert result.metrics["device"] == "cuda"
    assert result.metrics["test"]["auc"] > 0.6
