"""Scoring splits: the threshold comes from dev; an unlabeled split gets predictions, no metrics."""

from __future__ import annotations

import numpy as np

from memetrain.eval.protocols import Outputs, score_splits


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
