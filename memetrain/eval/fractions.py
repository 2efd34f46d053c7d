"""Label fractions: which labeled examples a run at 5 %, 10 %, 30 % ... of the labels may use.

Each class is shuffled once by a generator seeded from (seed, class), and a fraction takes a
prefix of that order, so for one seed the 5 % subset lies inside the 10 % subset, and curves over
fractions compare like with like. The result depends only on the labels, the fraction and the seed.
"""

from __future__ import annotations

import numpy as np

from memetrain.errors import ConfigError

UNLABELED = -1


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of the labeled entries (label -1 is unlabeled).

    Each class keeps round(fraction * its count) examples, and at least one; 1.0 keeps them all.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(
            f"label_fraction must be in (0, 1]; got {fraction:g} (e.g. 0.05 for 5 % of the labels, 1.0 for all)"
        )
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {seed!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or np.any(labels < UNLABELED) or np.any(labels != np.round(labels)):
        raise ValueError("labels must be a 1-d array of class ids >= 0, with -1 for unlabeled")
    labels = labels.astype(np.int64)
    classes = np.unique(labels[labels != UNLABELED])
    if len(classes) == 0:
        raise ConfigError(
            f"label_fraction needs labeled examples, but all {len(labels)} are unlabeled (-1); "
            "choose a split with labels"
        )
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng([int(seed), int(label)]).permutation(members)
        keep = max(1, int(np.floor(fraction * len(members) + 0.5)))
        chosen.append(order[:keep])
    return np.sort(np.concatenate(chosen))
