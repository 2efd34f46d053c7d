"""Label fractions: which labeled examples a run at 5 %, 10 %, 30 % ... of the labels may use.

Each class is shuffled once by a generator seeded from (seed, class), and a fraction takes a
prefix of that order, so for one seed the 5 % subset lies inside the 10 % subset, and curves over
fractions compare like with like. The result depends only on the labels, the fraction and the seed.

A data set without a dev split (MAMI) gets one carved from its train split (:func:`dev_from_train`),
before any fraction is drawn, and the fractions are drawn from what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

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


DEV_STREAM = 0xDE5  # the dev carve's generators are seeded apart from the label fractions'


@dataclass(frozen=True)
class TrainDevSplit:
    """A split's memes in two: ``train`` kept for training, ``dev`` held out for validation (sorted
    indices into the split; together every meme once)."""

    train: np.ndarray
    dev: np.ndarray

    def labeled_fraction(self, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
        """Sorted indices (into the split) of :func:`label_fraction_indices` of ``labels`` (the main
        label ``[N]``) taken among the ``train`` memes only: stratified and nested as ever, never a dev meme."""
        return self.train[label_fraction_indices(np.asarray(labels)[self.train], fraction, seed)]


def dev_from_train(labels: np.ndarray, share: float, seed: int) -> TrainDevSplit:
    """Hold out a stratified, seeded ``share`` of a split's labeled memes as a dev split (MAMI has
    none: the SemiMemes code validates on a carved ``val.csv``, as the task's participants did).

    ``labels``: ``[N]`` (the main label) or ``[N, L]`` (every label column: the strata are the label
    combinations, so MAMI's task-B types keep their shares in dev too); -1 is missing. A meme with a
    missing label stays in train. Each stratum is shuffled by a generator seeded from (``seed``, the
    dev stream, the stratum's index) and gives round(``share`` x its size) memes to dev, so the carve
    depends only on the labels, the share and the seed, never on a label fraction: carve first, then
    draw the fraction from ``train`` (:meth:`TrainDevSplit.labeled_fraction`).
    """
    if not 0 < share < 1:
        raise ConfigError(
            f"data.dev_from_train={share!r}: give the share of the train split to hold out, in (0, 1), e.g. 0.1"
        )
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {seed!r}")
    labels = np.asarray(labels)
    rows = labels.reshape(len(labels), -1).astype(np.int64)  # [N, L]
    labeled = np.flatnonzero((rows != UNLABELED).all(axis=1))
    if len(labeled) == 0:
        raise ConfigError("data.dev_from_train needs labeled memes in the train split, but it has none")
    strata, inverse = np.unique(rows[labeled], axis=0, return_inverse=True)
    dev = []
    for index in range(len(strata)):
        members = labeled[inverse.reshape(-1) == index]
        order = np.random.default_rng([int(seed), DEV_STREAM, index]).permutation(members)
        dev.append(order[: int(np.floor(share * len(members) + 0.5))])
    dev_indices = np.sort(np.concatenate(dev))
    train_indices = np.setdiff1d(np.arange(len(labels)), dev_indices)
    return TrainDevSplit(train=train_indices, dev=dev_indices)
