"""Scoring splits: the threshold comes from dev; an unlabeled split gets predictions, no metrics."""

from __future__ import annotations

import numpy as np
import pytest

from memetrain.eval.protocols import Outputs, score_splits, score_targets


def outputs(labels: list[int]) -> Outputs:
    n = len(labels)
    return Outputs([f"m{i}" for i in range(n)], np.array(labels)[:, None], np.zeros((n, 2)), None)


def test_threshold_from_dev_applies_to_test_and_unlabeled_test_is_noted():
    outs = {"dev": outputs([0, 0, 1, 1]), "test": outputs([0, 1, 1, 0]), "test_unseen": outputs([-1, -1, -1])}
    scores = {
        "dev": np.array([0.1, 0.2, 0.3, 0.4]),  # separable at 0.25, not at 0.5
        "test": np.array([0.2, 0.3, 0.35, 0.1]),
        "test_unseen": np.array([0.9, 0.1, 0.5]),
    }
    result = score_splits(scores, outs, label_index=0, dev_split="dev", label_fraction=0.1)
    assert result["threshold_source"] == "dev" and result["threshold"] == 0.25
    assert result["splits"]["dev"]["accuracy"] == 1.0
    assert result["splits"]["test"]["accuracy"] == 1.0
    assert result["splits"]["test"]["label_fraction"] == 0.1
    assert result["splits"]["test_unseen"] == {
        "num_samples": 3,
        "unlabeled": 3,
        "note": "split has unlabeled memes: predictions written, no metrics",
    }


def test_without_a_labeled_dev_split_the_threshold_is_one_half():
    outs = {"test": outputs([0, 1])}
    result = score_splits({"test": np.array([0.4, 0.6])}, outs, 0, dev_split=None, label_fraction=1.0)
    assert result["threshold"] == 0.5 and result["threshold_source"] == "default"


def multi_outputs(labels: list[list[int]]) -> Outputs:
    rows = np.array(labels)
    return Outputs([f"m{i}" for i in range(len(rows))], rows, np.zeros((len(rows), 2)), None)


NAMES = ["misogynous", "shaming", "violence"]


def test_task_a_in_splits_and_the_other_targets_in_multilabel_each_at_its_dev_threshold():
    # dev: misogynous separable at 0.5, shaming only at 0.25 (between 0.2 and 0.3), violence at 0.8
    dev = multi_outputs([[0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
    test = multi_outputs([[1, 1, 0], [0, 0, 1], [1, 0, 0]])
    dev_scores = np.array([[0.1, 0.1, 0.6], [0.9, 0.2, 0.7], [0.8, 0.3, 0.9], [0.2, 0.4, 0.1]])
    test_scores = np.array([[0.7, 0.35, 0.7], [0.3, 0.1, 0.8], [0.6, 0.2, 0.2]])
    result = score_targets(
        {"dev": dev_scores, "test": test_scores},
        {"dev": dev, "test": test},
        NAMES,
        NAMES,
        "misogynous",
        "dev",
        0.05,
    )
    assert result["targets"] == NAMES and result["threshold_source"] == "dev"
    assert result["splits"]["test"]["accuracy"] == 1.0 and result["splits"]["test"]["label_fraction"] == 0.05
    test_b = result["multilabel"]["test"]
    assert test_b["labels"] == ["shaming", "violence"]
    assert test_b["per_label"]["shaming"]["threshold"] == pytest.approx(0.25)
    assert test_b["per_label"]["violence"]["threshold"] == pytest.approx(0.8)
    # at those thresholds every test prediction is right: each label's macro F1 is 1
    assert test_b["f1_weighted_macro"] == 1.0 and test_b["label_fraction"] == 0.05


def test_task_b_alone_has_no_task_a_metrics_and_an_unlabeled_split_gets_a_note():
    outs = {"test": multi_outputs([[1, 1, 0], [0, 0, 1]]), "hidden": multi_outputs([[-1, -1, -1]])}
    scores = {"test": np.array([[0.9, 0.1], [0.2, 0.8]]), "hidden": np.array([[0.5, 0.5]])}
    result = score_targets(scores, outs, ["shaming", "violence"], NAMES, "misogynous", None, 1.0)
    assert result["splits"] == {} and "threshold" not in result
    assert result["multilabel"]["test"]["per_label"]["shaming"]["threshold"] == 0.5
    assert result["multilabel"]["hidden"]["note"].startswith("split has unlabeled memes")


def test_a_fixed_threshold_replaces_the_dev_choice_for_every_label():
    outs = {
        "dev": Outputs(
            ["a", "b", "c", "d"], np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), np.zeros((4, 1)), None
        ),
        "test": Outputs(["e", "f"], np.array([[1, 1], [0, 0]]), np.zeros((2, 1)), None),
    }
    scores = {
        "dev": np.array([[0.6, 0.7], [0.65, 0.8], [0.9, 0.2], [0.8, 0.9]]),
        "test": np.array([[0.7, 0.55], [0.3, 0.6]]),
    }
    chosen = score_targets(scores, outs, ["m", "o"], ["m", "o"], "m", "dev", 1.0)
    assert chosen["threshold_source"] == "dev" and chosen["threshold"] == pytest.approx(0.725)
    assert chosen["splits"]["test"]["confusion_matrix"] == [[1, 0], [1, 0]]  # 0.7 is below 0.725
    fixed = score_targets(scores, outs, ["m", "o"], ["m", "o"], "m", "dev", 1.0, fixed=0.5)
    assert (fixed["threshold"], fixed["threshold_source"]) == (0.5, "fixed")
    assert fixed["splits"]["test"]["confusion_matrix"] == [[1, 0], [0, 1]]
    assert fixed["multilabel"]["test"]["per_label"]["o"]["threshold"] == 0.5
