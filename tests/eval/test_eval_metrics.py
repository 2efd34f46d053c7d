"""Metrics against values worked out by hand, and multi-label F1 against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from memetrain.errors import ConfigError
from memetrain.eval import best_threshold, binary_metrics, multilabel_metrics

# Five negatives, three positives. At threshold 0.5 the predictions are [0, 0, 0, 1, 1, 0, 1, 1]:
# tn = 3 (0.1, 0.2, 0.35), fp = 2 (0.6, 0.7), fn = 1 (0.4), tp = 2 (0.8, 0.9).
LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.35, 0.6, 0.7, 0.4, 0.8, 0.9])


def test_binary_metrics_match_hand_computation():
    m = binary_metrics(LABELS, SCORES)
    tn, fp, fn, tp = 3, 2, 1, 2
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["num_samples"] == 8 and m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx((tp + tn) / 8)
    assert m["positive_rate"] == pytest.approx((tp + fp) / 8)

    f1_neg = 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)  # precision tn/(tn+fn), recall tn/(tn+fp)
    f1_pos = 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)  # precision tp/(tp+fp), recall tp/(tp+fn)
    assert m["per_class"]["0"] == pytest.approx(
        {"precision": 3 / 4, "recall": 3 / 5, "f1": f1_neg, "support": 5}
    )
    assert m["per_class"]["1"] == pytest.approx(
        {"precision": 2 / 4, "recall": 2 / 3, "f1": f1_pos, "support": 3}
    )
    assert f1_neg == pytest.approx(2 / 3) and f1_pos == pytest.approx(4 / 7)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 4 / 7) / 2)
    assert m["f1_weighted"] == pytest.approx((5 * 2 / 3 + 3 * 4 / 7) / 8)

    # Positive/negative pairs ranked right: 0.4 beats 3 negatives, 0.8 and 0.9 beat all 5.
    assert m["auroc"] == pytest.approx((3 + 5 + 5) / (3 * 5))
    assert m["auroc_reason"] is None


def test_binary_metrics_are_plain_json():
    m = binary_metrics(LABELS, SCORES, threshold=0.3)
    assert json.loads(json.dumps(m)) == m
    assert m["confusion_matrix"] == [[2, 3], [0, 3]]


def test_auroc_is_none_with_one_class():
    m = binary_metrics(np.ones(4, dtype=int), np.array([0.2, 0.4, 0.6, 0.8]))
    assert m["auroc"] is None
    assert "only class 1" in m["auroc_reason"]
    assert m["accuracy"] == pytest.approx(0.5)


def test_binary_metrics_reject_unlabeled_and_mismatched_inputs():
    with pytest.raises(ValueError, match="unlabeled"):
        binary_metrics(np.array([0, 1, -1]), np.array([0.1, 0.9, 0.5]))
    with pytest.raises(ValueError, match="one length"):
        binary_metrics(np.array([0, 1]), np.array([0.1, 0.9, 0.5]))


def test_best_threshold_finds_the_separating_cut():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.15, 0.2, 0.3, 0.4])  # every score is below 0.5
    for criterion in ("accuracy", "f1_macro"):
        cut = best_threshold(labels, scores, criterion)
        assert cut == pytest.approx((0.15 + 0.2) / 2)
        assert binary_metrics(labels, scores, cut)["accuracy"] == 1.0


def test_best_threshold_breaks_ties_toward_half():
    # Cuts 0.2 and 0.75 both reach accuracy 3/4; 0.75 lies nearer 0.5.
    assert best_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.3, 0.6, 0.9])) == pytest.approx(0.75)
    # Perfectly separated around 0.5: the midpoint itself wins.
    assert best_threshold(np.array([0, 1]), np.array([0.3, 0.7])) == pytest.approx(0.5)


def test_best_threshold_rejects_unknown_criterion():
    with pytest.raises(ConfigError, match="criterion must be one of accuracy, f1_macro; got 'auroc'"):
        best_threshold(LABELS, SCORES, "auroc")


def mami_task_b_score(labels: np.ndarray, predicted: np.ndarray) -> float:
    """SemEval-2022 MAMI sub-task B as its evaluation.py scores it, written out naively: per label,
    the mean of both classes' F1 from confusion counts, weighted by the label's positive count."""
    total, weights = 0.0, 0
    for k in range(labels.shape[1]):
        f1s = []
        for cls in (1, 0):
            tp = sum(1 for y, p in zip(labels[:, k], predicted[:, k]) if y == cls and p == cls)
            fp = sum(1 for y, p in zip(labels[:, k], predicted[:, k]) if y != cls and p == cls)
            fn = sum(1 for y, p in zip(labels[:, k], predicted[:, k]) if y == cls and p != cls)
            precision = tp / (tp + fp) if tp else 0.0
            recall = tp / (tp + fn) if tp else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        weight = int(labels[:, k].sum())
        total, weights = total + weight * sum(f1s) / 2, weights + weight
    return total / weights


def test_multilabel_metrics_match_sklearn_and_the_mami_scorer():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 4)) < [0.5, 0.3, 0.2, 0.1]).astype(int)
    scores = np.clip(labels * 0.4 + rng.random((40, 4)) * 0.6, 0, 1)
    thresholds = [0.5, 0.4, 0.6, 0.5]
    names = ["shaming", "stereotype", "objectification", "violence"]
    m = multilabel_metrics(labels, scores, names, thresholds)
    predicted = (scores >= thresholds).astype(int)

    assert m["f1_weighted"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    support = labels.sum(axis=0)
    per_label_macro = [f1_score(labels[:, k], predicted[:, k], average="macro") for k in range(4)]
    assert m["f1_weighted_macro"] == pytest.approx(np.dot(per_label_macro, support) / support.sum())
    assert m["f1_weighted_macro"] == pytest.approx(mami_task_b_score(labels, predicted))
    aurocs = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(4)]
    assert m["auroc"] == pytest.approx(np.mean(aurocs)) and m["auroc_reason"] is None
    assert list(m["per_label"]) == names == m["labels"]
    for k, name in enumerate(names):
        label = m["per_label"][name]
        assert label["auroc"] == pytest.approx(aurocs[k])
        assert label["f1"] == pytest.approx(f1_score(labels[:, k], predicted[:, k]))
        assert label["precision"] == pytest.approx(precision_score(labels[:, k], predicted[:, k]))
        assert label["recall"] == pytest.approx(recall_score(labels[:, k], predicted[:, k]))
        assert label["support"] == support[k] and label["threshold"] == thresholds[k]
    assert json.loads(json.dumps(m)) == m


def test_multilabel_auroc_is_none_when_a_label_has_one_class():
    labels = np.array([[0, 1], [1, 1], [0, 1]])
    m = multilabel_metrics(labels, np.full((3, 2), 0.7), ["a", "b"])
    assert m["auroc"] is None and "['b']" in m["auroc_reason"]
    assert m["per_label"]["a"]["auroc"] == 0.5


def test_multilabel_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        multilabel_metrics(np.zeros((3, 3)), np.zeros((3, 3)), ["a", "b"])
