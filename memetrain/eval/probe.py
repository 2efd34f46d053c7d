"""Feature-based protocols on frozen features: a logistic-regression linear probe and weighted kNN.

Both take numpy arrays or torch tensors, ignore unlabeled (-1) training rows, and return the
probability of class 1 for every query row, labeled or not (:func:`linear_probe`,
:func:`knn_scores`), or for a label of K class ids the probability of every class
(:func:`linear_probe_classes`, :func:`knn_class_scores`); the caller computes the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class LinearHead:
    """A fitted probe as plain arrays: ``sigmoid(((x - mean) / scale) @ weight + bias)`` is its
    probability of class 1 (what scikit-learn's standardise + logistic regression computes), so a
    model bundle can carry it without pickling scikit-learn objects."""

    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    weight: np.ndarray  # [D]
    bias: float


@dataclass(frozen=True)
class ProbeResult:
    """Probabilities of class 1 per eval split, the inverse regularisation ``c`` that was used,
    and the fitted probe."""

    scores: dict[str, np.ndarray]
    c: float
    head: LinearHead


def linear_probe(
    train_x: Any,
    train_y: Any,
    eval_sets: Mapping[str, tuple[Any, Any]],
    seed: int,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
) -> ProbeResult:
    """Fit standardise + logistic regression on the labeled train rows and score every eval split.

    C is the value in ``cs`` with the lowest log-loss on a stratified ``val_fraction`` of train
    (ties to the smaller C), refit on all of train. A class with a single example leaves nothing
    to hold out, and C falls back to 1.0. ``eval_sets`` maps a name to (features, labels or None).
    """
    x, y = _labeled(_features(train_x, "train_x"), train_y)
    if set(np.unique(y)) != {0, 1}:
        raise ConfigError(
            f"the linear probe needs both classes 0 and 1 among the training labels; got {sorted(set(y.tolist()))} "
            f"in {len(y)} examples (raise label_fraction or check the train split)"
        )
    queries = {}
    for name, (features, labels) in eval_sets.items():
        queries[name] = _features(features, name)
        if labels is not None and len(np.asarray(labels)) != len(queries[name]):
            raise ValueError(f"eval set {name!r}: {len(queries[name])} feature rows but {len(labels)} labels")
    c = _choose_c(x, y, cs, val_fraction, seed, max_iter)
    model = _pipeline(c, seed, max_iter).fit(x, y)
    scaler, regression = model[0], model[1]
    head = LinearHead(scaler.mean_, scaler.scale_, regression.coef_[0], float(regression.intercept_[0]))
    return ProbeResult({name: model.predict_proba(q)[:, 1] for name, q in queries.items()}, c, head)


def linear_probe_classes(
    train_x: Any,
    train_y: Any,
    eval_sets: Mapping[str, Any],
    num_classes: int,
    seed: int,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
) -> dict[str, np.ndarray]:
    """:func:`linear_probe` for a label of class ids ``0 .. num_classes-1``: standardise + multinomial
    logistic regression, C chosen the same way; the probabilities ``[N, num_classes]`` of every eval
    set's rows (``eval_sets`` maps a name to features), 0 for a class absent from train."""
    x, y = _labeled(_features(train_x, "train_x"), train_y, num_classes)
    present = np.unique(y)
    if len(present) < 2:
        raise ConfigError(
            f"the linear probe needs at least two classes among the training labels; got {present.tolist()} "
            f"in {len(y)} examples (raise label_fraction or check the train split)"
        )
    c = _choose_c(x, y, cs, val_fraction, seed, max_iter)
    model = _pipeline(c, seed, max_iter).fit(x, y)
    out = {}
    for name, features in eval_sets.items():
        q = _features(features, name)
        probabilities = np.zeros((len(q), num_classes))
        probabilities[:, model.classes_] = model.predict_proba(q)
        out[name] = probabilities
    return out


def knn_scores(
    train_x: Any, train_y: Any, query_x: Any, k: int = 20, temperature: float = 0.07
) -> np.ndarray:
    """Cosine-similarity kNN vote, each of the k neighbours weighted by exp(similarity / temperature).

    As in the weighted kNN of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination") used by DINO (Caron et al. 2021); votes are normalised to a
    probability of class 1. k is capped at the number of labeled train rows.
    """
    return knn_class_scores(train_x, train_y, query_x, 2, k, temperature)[:, 1]


def knn_class_scores(
    train_x: Any, train_y: Any, query_x: Any, num_classes: int, k: int = 20, temperature: float = 0.07
) -> np.ndarray:
    """:func:`knn_scores` for labels ``0 .. num_classes-1``: each class's share of the weighted
    votes, ``[N, num_classes]`` (rows sum to 1)."""
    if k < 1:
        raise ConfigError(f"knn k must be >= 1; got {k}")
    if temperature <= 0:
        raise ConfigError(f"knn temperature must be > 0; got {temperature} (DINO uses 0.07)")
    x, y = _labeled(_features(train_x, "train_x"), train_y, num_classes)
    if len(y) == 0:
        raise ConfigError("kNN needs labeled training rows, but every train label is -1")
    bank = _unit(x)
    queries = _unit(_features(query_x, "query_x"))
    k = min(k, len(y))
    out = np.empty((len(queries), num_classes))
    for start in range(0, len(queries), 1024):  # bounds the [chunk, train] similarity matrix
        sim = queries[start : start + 1024] @ bank.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, top, axis=1)
        weights = np.exp((top_sim - top_sim.max(axis=1, keepdims=True)) / temperature)  # [chunk, k]
        votes = y[top][:, :, None] == np.arange(num_classes)  # [chunk, k, classes]
        out[start : start + 1024] = (weights[:, :, None] * votes).sum(axis=1) / weights.sum(axis=1)[:, None]
    return out


def _choose_c(
    x: np.ndarray, y: np.ndarray, cs: Sequence[float], val_fraction: float, seed: int, max_iter: int
) -> float:
    cs, classes = sorted(cs), np.unique(y)
    held = np.zeros(len(y), dtype=bool)
    for label in classes.tolist():
        members = np.flatnonzero(y == label)
        if len(members) < 2:
            log.info(
                "linear probe: class %d has %d example(s); using C=1.0 without search", label, len(members)
            )
            return 1.0
        count = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        held[np.random.default_rng([seed, label]).permutation(members)[:count]] = True
    losses = [
        log_loss(
            y[held],
            _pipeline(c, seed, max_iter).fit(x[~held], y[~held]).predict_proba(x[held]),
            labels=classes,
        )
        for c in cs
    ]
    return float(cs[int(np.argmin(losses))])  # the first, smallest C among equal losses


def _pipeline(c: float, seed: int, max_iter: int) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))


def _features(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on GPU or in bfloat16
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features; got shape {x.shape}")
    return x


def _labeled(x: np.ndarray, y: Any, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose label is not -1, with their labels as int64."""
    y = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y).astype(np.int64)
    if y.shape != (len(x),):
        raise ValueError(f"train labels must be [N] for {len(x)} feature rows; got shape {y.shape}")
    if not np.isin(y, np.arange(-1, num_classes)).all():
        if num_classes == 2:
            raise ValueError("train labels must be 0, 1, or -1 for unlabeled")
        raise ValueError(f"train labels must be class ids 0..{num_classes - 1}, or -1 for unlabeled")
    keep = y != -1
    return x[keep], y[keep]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
