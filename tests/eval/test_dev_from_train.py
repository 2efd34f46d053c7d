"""A dev split carved from train (data.dev_from_train; MAMI has none): stratified by the label
combination, seeded, independent of the label fraction, disjoint from the fractions drawn after it."""

from __future__ import annotations

import numpy as np
import pytest

from memetrain.errors import ConfigError
from memetrain.eval.fractions import dev_from_train


@pytest.fixture
def task_b() -> np.ndarray:
    """MAMI-like [misogynous, shaming, violence]: 50 (0,0,0), 30 (1,1,0), 15 (1,0,1), 5 (1,1,1), 4 missing."""
    rows = [[0, 0, 0]] * 50 + [[1, 1, 0]] * 30 + [[1, 0, 1]] * 15 + [[1, 1, 1]] * 5 + [[-1, -1, -1]] * 4
    return np.random.default_rng(3).permutation(np.array(rows))


def test_each_label_combination_gives_its_share_to_dev(task_b):
    split = dev_from_train(task_b, 0.1, seed=0)
    dev_rows = [tuple(r) for r in task_b[split.dev]]
    # round(0.1 x n) of each combination, by hand: 5, 3, 2 (1.5 rounds up), 1 (0.5 rounds up)
    assert dev_rows.count((0, 0, 0)) == 5 and dev_rows.count((1, 1, 0)) == 3
    assert dev_rows.count((1, 0, 1)) == 2 and dev_rows.count((1, 1, 1)) == 1
    assert len(split.dev) == 11 and (-1, -1, -1) not in dev_rows  # missing labels stay in train
    assert sorted([*split.train, *split.dev]) == list(range(len(task_b)))
    assert np.all(np.diff(split.dev) > 0) and np.all(np.diff(split.train) > 0)


def test_seeded_and_reproducible(task_b):
    first = dev_from_train(task_b, 0.1, seed=5)
    np.testing.assert_array_equal(first.dev, dev_from_train(task_b.copy(), 0.1, seed=5).dev)
    assert not np.array_equal(first.dev, dev_from_train(task_b, 0.1, seed=6).dev)


def test_label_fractions_come_from_train_only_and_stay_nested(task_b):
    split = dev_from_train(task_b, 0.1, seed=0)
    main = task_b[:, 0]
    small, large = split.labeled_fraction(main, 0.1, 0), split.labeled_fraction(main, 0.3, 0)
    assert not set(small) & set(split.dev) and not set(large) & set(split.dev)
    assert set(small) <= set(large)
    # the dev carve does not depend on the fraction: the same dev whatever the fraction drawn after it
    np.testing.assert_array_equal(split.dev, dev_from_train(task_b, 0.1, seed=0).dev)


def test_one_dimensional_labels_stratify_by_class():
    labels = np.array([0] * 80 + [1] * 20)
    split = dev_from_train(labels, 0.25, seed=1)
    assert (labels[split.dev] == 0).sum() == 20 and (labels[split.dev] == 1).sum() == 5


@pytest.mark.parametrize("share", [0.0, 1.0, 1.5])
def test_a_share_outside_0_1_is_refused(share):
    with pytest.raises(ConfigError, match="data.dev_from_train"):
        dev_from_train(np.array([0, 1]), share, 0)
