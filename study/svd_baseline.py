"""The post-hoc baseline: compress a trained wide model's tables by truncated SVD.

Each N x D table E of the widest full model is replaced by its best rank-r approximation
U_r S_r V_r^T, with no fine-tuning. Served as the two factors (N x r and r x D, the small
one applied after the lookup), it costs (N r + r D) floats: about the bytes of a width-r
table. The model around the tables (width D) is unchanged. The question it answers: does
training through a factorisation beat compressing after training?
"""

from __future__ import annotations

import numpy as np
import torch

from mlet.dataset import Dataset, split_rows
from mlet.dlrm import DLRM
from mlet.metrics import classification_metrics
from study.table_analysis import bucket_auc, low_rank_bytes, table_spectra, truncate_rank
from train.trainer import TrainConfig, model_config_for, predict_rows, split_labels


def truncated_model(model: DLRM, rank: int) -> DLRM:
    """A copy of a full-table model with every table replaced by its rank-r approximation."""
    copy = DLRM(model.config, sparse=False)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for table in copy.embeddings.tables:
            weight = table.table.weight
            weight.copy_(torch.from_numpy(truncate_rank(weight.numpy(), rank)).float())
    return copy.eval()


def evaluate_truncated(
    dataset: Dataset,
    train_config: TrainConfig,
    state: dict[str, torch.Tensor],
    rank: int,
    buckets: np.ndarray,
) -> dict:
    """Metrics, bytes, frequency-bucket AUC and spectra of a rank-r truncation of a model.

    `state` holds the trained full model's weights, `train_config` the config it was
    trained with (its width D and split fractions).
    """
    model = DLRM(model_config_for(dataset, train_config), sparse=False)
    model.load_state_dict(state)
    model = truncated_model(model, rank)
    split = split_rows(len(dataset), train_config.val_fraction, train_config.test_fraction)
    device, batch = torch.device("cpu"), train_config.eval_batch_size
    test_scores = predict_rows(model, dataset, split.test, batch, device)
    val_scores = predict_rows(model, dataset, split.val, batch, device)
    val_labels, test_labels = split_labels(dataset, split.val), split_labels(dataset, split.test)
    sizes, width = dataset.schema.table_sizes, train_config.dim
    return {
        "metrics": {
            "val": classification_metrics(val_labels, val_scores),
            "test": classification_metrics(test_labels, test_scores),
            "best_epoch": 0,
            "epochs_run": 0,
        },
        "embedding_bytes": sum(low_rank_bytes(n, width, rank) for n in sizes),
        "bucket_auc": bucket_auc(test_labels, test_scores, buckets),
        "spectra": table_spectra([t.numpy() for t in model.embeddings.collapse()]),
    }
