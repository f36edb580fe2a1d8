import numpy as np
import pytest

from mlet.metrics import accuracy, log_loss, roc_auc


def test_auc_hand_computed_with_ties():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    # positives: 0.35, 0.8, 0.4 ; negatives: 0.1, 0.4, 0.4
    # pairs won: 0.35 > 0.1 (1); 0.8 > all (3); 0.4 > 0.1 (1) + ties with two 0.4 (2 * 0.5)
    assert roc_auc(labels, scores) == pytest.approx(6 / 9)


def test_auc_perfect_and_reversed():
    labels = np.array([0, 1, 0, 1])
    assert roc_auc(labels, np.array([0.1, 0.9, 0.2, 0.8])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.1, 0.8, 0.2])) == 0.0


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3]))


def test_logloss_and_accuracy():
    labels = np.array([1, 0])
    p = np.array([0.8, 0.4])
    assert log_loss(labels, p) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert accuracy(labels, p) == 1.0
    assert accuracy(labels, np.array([0.2, 0.6])) == 0.0
