"""Label fractions are stratified, deterministic, nested, and never pick unlabeled entries."""

from __future__ import annotations

import numpy as np
import pytest

from memetrain.errors import ConfigError
from memetrain.eval import label_fraction_indices

FRACTIONS = (0.05, 0.1, 0.3, 0.5, 1.0)


@pytest.fixture
def labels() -> np.ndarray:
    """70 negatives, 30 positives and 20 unlabeled (-1), shuffled."""
    labels = np.array([0] * 70 + [1] * 30 + [-1] * 20)
    return np.random.default_rng(7).permutation(labels)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_class_proportions_are_kept(labels, fraction):
    chosen = label_fraction_indices(labels, fraction, seed=0)
    for label, count in ((0, 70), (1, 30)):
        assert abs(np.sum(labels[chosen] == label) - max(1, fraction * count)) <= 1
    assert len(np.unique(chosen)) == len(chosen)
    assert np.all(np.diff(chosen) > 0)


def test_same_seed_same_indices_other_seed_others(labels):
    first = label_fraction_indices(labels, 0.3, seed=3)
    np.testing.assert_array_equal(first, label_fraction_indices(labels.copy(), 0.3, seed=3))
    assert not np.array_equal(first, label_fraction_indices(labels, 0.3, seed=4))


def test_indices_are_pinned():
    # Seeded by numpy's SeedSequence, not hash(): the same on every interpreter and machine. If a numpy
    # upgrade changes these, subsets of earlier runs can no longer be reproduced.
    chosen = label_fraction_indices(np.array([0, 1] * 10), 0.3, seed=0)
    assert chosen.tolist() == [3, 4, 7, 8, 12, 19]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smaller_fractions_nest_in_larger(labels, seed):
    subsets = [set(label_fraction_indices(labels, f, seed).tolist()) for f in FRACTIONS]
    for smaller, larger in zip(subsets, subsets[1:]):
        assert smaller < larger


def test_at_least_one_of_each_class():
    labels = np.array([0] * 97 + [1] * 3)
    chosen = label_fraction_indices(labels, 0.05, seed=0)
    assert np.sum(labels[chosen] == 1) == 1
    assert np.sum(labels[chosen] == 0) == 5


def test_unlabeled_never_selected(labels):
    for fraction in FRACTIONS:
        assert np.all(labels[label_fraction_indices(labels, fraction, seed=0)] != -1)
    np.testing.assert_array_equal(label_fraction_indices(labels, 1.0, seed=0), np.flatnonzero(labels != -1))


@pytest.mark.parametrize(("fraction", "shown"), [(0, "0"), (1.5, "1.5"), (-0.1, "-0.1")])
def test_fraction_out_of_range_is_a_config_error(labels, fraction, shown):
    with pytest.raises(ConfigError, match=rf"label_fraction must be in \(0, 1\]; got {shown}"):
        label_fraction_indices(labels, fraction, seed=0)


def test_all_unlabeled_is_a_config_error():
    with pytest.raises(ConfigError, match="all 3 are unlabeled"):
        label_fraction_indices(np.array([-1, -1, -1]), 0.5, seed=0)
