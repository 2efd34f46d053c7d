"""Linear probe and weighted kNN on synthetic features with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.eval import binary_metrics, knn_scores, linear_probe


def blobs(n: int, seed: int, dim: int = 16, gap: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs whose means lie ``gap`` apart: linearly separable up to a little overlap."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    direction = np.eye(dim)[0]
    return rng.normal(size=(n, dim)) + np.outer(labels - 0.5, direction) * gap, labels


def test_linear_probe_separates_blobs_and_scores_unlabeled_sets():
    train_x, train_y = blobs(200, seed=0)
    test_x, test_y = blobs(200, seed=1)
    unlabeled_x, _ = blobs(30, seed=2)
    result = linear_probe(
        train_x, train_y, {"test": (test_x, test_y), "unlabeled": (unlabeled_x, None)}, seed=0
    )
    metrics = binary_metrics(test_y, result.scores["test"])
    assert metrics["accuracy"] > 0.9 and metrics["auroc"] > 0.95
    assert result.scores["unlabeled"].shape == (30,)
    assert np.all((result.scores["unlabeled"] >= 0) & (result.scores["unlabeled"] <= 1))
    assert result.c in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def test_linear_probe_is_at_chance_on_random_labels():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(400, 16))
    train_y, test_y = rng.integers(0, 2, 300), rng.integers(0, 2, 400)
    result = linear_probe(train_x, train_y, {"test": (test_x, test_y)}, seed=0)
    metrics = binary_metrics(test_y, result.scores["test"])
    assert 0.4 < metrics["accuracy"] < 0.6 and 0.4 < metrics["auroc"] < 0.6


def test_linear_probe_is_deterministic_ignores_unlabeled_rows_and_takes_tensors():
    train_x, train_y = blobs(120, seed=3)
    test_x, _ = blobs(50, seed=4)
    first = linear_probe(train_x, train_y, {"test": (test_x, None)}, seed=5)
    noisy_x = np.concatenate([train_x, np.full((10, 16), 50.0)])
    noisy_y = np.concatenate([train_y, np.full(10, -1)])
    second = linear_probe(
        torch.from_numpy(noisy_x).float(),
        torch.from_numpy(noisy_y),
        {"test": (torch.from_numpy(test_x), None)},
        seed=5,
    )
    assert second.c == first.c
    np.testing.assert_allclose(second.scores["test"], first.scores["test"], atol=1e-4)


def test_linear_probe_with_one_example_per_class_uses_default_c():
    x = np.array([[0.0, 1.0], [1.0, 0.0]])
    result = linear_probe(x, np.array([0, 1]), {"train": (x, None)}, seed=0)
    assert result.c == 1.0
    assert result.scores["train"][1] > 0.5 > result.scores["train"][0]


def test_linear_probe_needs_both_classes():
    with pytest.raises(ConfigError, match="needs both classes"):
        linear_probe(np.ones((4, 2)), np.array([1, 1, -1, 1]), {}, seed=0)


def test_knn_matches_hand_computation():
    # The query is the class-0 point (cosine 1) and orthogonal to the class-1 point (cosine 0).
    scores = knn_scores(
        np.array([[2.0, 0.0], [0.0, 3.0]]), np.array([0, 1]), np.array([[5.0, 0.0]]), k=20, temperature=0.1
    )
    assert scores[0] == pytest.approx(math.exp(0 / 0.1) / (math.exp(1 / 0.1) + math.exp(0 / 0.1)))


def test_knn_uses_only_the_k_nearest():
    train_x = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    scores = knn_scores(train_x, np.array([1, 1, 0]), np.array([[1.0, 0.05], [0.0, 1.0]]), k=1)
    np.testing.assert_array_equal(scores, [1.0, 0.0])


def test_knn_classifies_blobs():
    train_x, train_y = blobs(300, seed=0, gap=6.0)
    test_x, test_y = blobs(200, seed=1, gap=6.0)
    train_x, test_x = train_x + np.eye(16)[1] * 4, test_x + np.eye(16)[1] * 4  # cosine needs an offset
    metrics = binary_metrics(test_y, knn_scores(torch.from_numpy(train_x), train_y, test_x))
    assert metrics["accuracy"] > 0.9 and metrics["auroc"] > 0.95


def test_knn_rejects_bad_options():
    x, y = blobs(10, seed=0)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        knn_scores(x, y, x, k=0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        knn_scores(x, y, x, temperature=0)
