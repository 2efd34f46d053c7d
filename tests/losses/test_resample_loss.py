"""SemiMemes' distribution-balanced loss (FPTU-Thesis-CSAI/SemiMemes src/loss.py 85-173 with the
defaults of src/arguments.py 171-182) against a naive reference written here and a case by hand,
and the counts it takes from the labeled memes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.losses.resample import ResampleLoss
from memetrain.methods import DataInfo
from memetrain.methods.objective import ClassificationObjective

ALPHA, BETA, MU, NEG_SCALE, INIT_BIAS = 10.0, 0.2, 0.1, 5.0, 0.1


def naive_resample(
    logits: list[list[float]], labels: list[list[int]], positives: list[int], total: int
) -> float:
    """Entry by entry, with Python floats."""
    entries = []
    for row_logits, row_labels in zip(logits, labels):
        repeat = sum(max(y, 0) / n for y, n in zip(row_labels, positives))  # a missing label (-1) as 0
        for x, y, n in zip(row_logits, row_labels, positives):
            if y < 0:
                continue  # missing: no entry
            if repeat > 0:
                weight = 1 / (1 + math.exp(-BETA * ((1 / n) / repeat - MU))) + ALPHA
            else:
                weight = 1 + ALPHA  # sigmoid(+inf) = 1
            z = x - math.log(total / n - 1) * INIT_BIAS / NEG_SCALE
            if y == 0:
                z, weight = z * NEG_SCALE, weight / NEG_SCALE
            p = 1 / (1 + math.exp(-z))
            entries.append(-weight * (y * math.log(p) + (1 - y) * math.log(1 - p)))
    return sum(entries) / len(entries)


def loss_with_counts(positives, total) -> ResampleLoss:
    loss = ResampleLoss(len(positives))
    loss.set_counts(torch.tensor(positives), total)
    return loss


def test_matches_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 2
    labels = torch.tensor(
        [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
    )
    positives, total = [30, 12, 25, 5], 100
    loss = loss_with_counts(positives, total)(logits, labels)
    assert loss.item() == pytest.approx(
        naive_resample(logits.tolist(), labels.tolist(), positives, total), rel=1e-5
    )


def test_one_entry_by_hand():
    # one label, 25 positives of 100; a positive meme with logit 0: r = 1/25, 1/(n r) = 1,
    # w = sigmoid(0.2 (1 - 0.1)) + 10; bias -log(100/25 - 1) x 0.1 / 5 = -log(3) / 50
    weight = 1 / (1 + math.exp(-0.18)) + 10
    z = -math.log(3) / 50
    expected = -weight * math.log(1 / (1 + math.exp(-z)))
    loss = loss_with_counts([25], 100)(torch.zeros(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(expected)
    # a negative meme: logit scaled by 5, weight (1 + 10) / 5 (no positive label: r = 0)
    z_negative = 5 * z
    expected = -(11 / 5) * math.log(1 - 1 / (1 + math.exp(-z_negative)))
    assert loss_with_counts([25], 100)(torch.zeros(1, 1), torch.zeros(1, 1)).item() == pytest.approx(expected)


def test_missing_labels_count_in_no_term():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    labels = torch.tensor([[1, -1], [0, 1]])
    expected = naive_resample(logits.tolist(), labels.tolist(), [10, 20], 50)  # 3 entries
    assert loss_with_counts([10, 20], 50)(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_the_objective_counts_positives_among_the_labeled_memes():
    info = DataInfo(["misogynous", "shaming", "violence"], "misogynous", vocab_size=None)
    objective = ClassificationObjective(info, ["shaming", "violence"], "resample", 2.0)
    labels = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1], [0, -1, 0]])  # the last: unlabeled
    objective.observe_labels(labels, info.label_names)
    assert objective.resample.positives.tolist() == [2, 2] and objective.resample.total.item() == 4


def test_a_label_without_positives_is_refused():
    with pytest.raises(ConfigError, match="label violence is positive for 0 of 8"):
        ResampleLoss(2).set_counts(torch.tensor([3, 0]), 8, ["shaming", "violence"])


def test_without_counts_it_says_what_is_missing():
    with pytest.raises(ConfigError, match="observe_labels"):
        ResampleLoss(1)(torch.zeros(1, 1), torch.ones(1, 1))
