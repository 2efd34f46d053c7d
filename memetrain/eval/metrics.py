"""Classification metrics as plain JSON-serialisable dicts (floats, ints, lists).

Binary scores are probabilities of class 1; a sample is predicted positive when ``score >= threshold``.
Class-id labels (:func:`multiclass_metrics`) are scored from ``[N, K]`` class probabilities, each
sample predicted as its most probable class.
Precision, recall and F1 of a class that is neither present nor predicted are 0 (scikit-learn's
``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from memetrain.errors import ConfigError

CRITERIA = ("accuracy", "f1_macro")


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """AUROC, accuracy, macro/weighted F1, per-class P/R/F1, confusion matrix [[tn, fp], [fn, tp]].

    ``auroc`` is None when only one class is present, and ``auroc_reason`` says why (else None).
    ``positive_rate`` is the fraction of samples predicted positive.
    """
    y, s = _binary_inputs(labels, scores)
    pred = (s >= threshold).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    auroc, reason = _auroc(y, s)
    return {
        "num_samples": int(len(y)),
        "threshold": float(threshold),
        "auroc": auroc,
        "auroc_reason": reason,
        "accuracy": float(np.mean(pred == y)),
        "f1_macro": float(np.mean(f1)),
        "f1_weighted": float(np.sum(f1 * support) / np.sum(support)),
        "per_class": {
            str(c): {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in (0, 1)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "positive_rate": float(np.mean(pred)),
    }


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, macro and weighted F1, one-vs-rest AUROC, per-class P/R/F1 and the confusion matrix
    (rows: true class, columns: predicted) of class ids ``labels [N]`` in ``0 .. K-1`` scored by
    ``probabilities [N, K]`` (the prediction is the argmax; ties to the lower id).

    ``f1_macro`` is the plain mean over the K classes (a class neither present nor predicted
    scores 0, as scikit-learn's ``zero_division=0``); ``chance`` is the accuracy of always
    predicting the most frequent class. ``auroc_ovr`` is the mean of each present class's AUROC
    against the rest; None (``auroc_reason``) when fewer than two classes are present.
    """
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    k = len(classes)
    if y.ndim != 1 or p.shape != (len(y), k) or len(y) == 0:
        raise ValueError(
            f"labels must be [N] and probabilities [N, {k}] with N > 0; got {y.shape}, {p.shape}"
        )
    if not np.isin(y, np.arange(k)).all():
        raise ValueError(f"labels must be class ids 0..{k - 1}; drop unlabeled (-1) samples first")
    if not np.isfinite(p).all():
        raise ValueError(f"probabilities hold {int(np.sum(~np.isfinite(p)))} non-finite values")
    y = y.astype(np.int64)
    pred = p.argmax(axis=1)
    ids = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=ids, zero_division=0)
    present = np.unique(y)
    if len(present) < 2:
        auroc, reason = None, f"only class {classes[int(present[0])]!r} present in {len(y)} labels"
    else:
        auroc = float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
        reason = None
    return {
        "num_samples": int(len(y)),
        "classes": list(classes),
        "accuracy": float(np.mean(pred == y)),
        "f1_macro": float(np.mean(f1)),
        "f1_weighted": float(np.sum(f1 * support) / np.sum(support)),
        "auroc_ovr": auroc,
        "auroc_reason": reason,
        "chance": float(np.bincount(y, minlength=k).max() / len(y)),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=ids).tolist(),
    }


def best_threshold(labels: np.ndarray, scores: np.ndarray, criterion: str = "accuracy") -> float:
    """The decision threshold that maximises ``criterion`` on these (dev) labels.

    Candidates are the midpoints between consecutive distinct scores, 0.5, and one cut below and
    one above all scores. Ties go to the candidate nearest 0.5, then to the smaller one.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"threshold criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    y, s = _binary_inputs(labels, scores)
    distinct = np.unique(s)
    candidates = np.unique(
        np.concatenate(
            [
                (distinct[:-1] + distinct[1:]) / 2,
                [0.5, distinct[0], np.nextafter(distinct[-1], np.inf)],
            ]
        )
    )
    values = _criterion_at(y, s, candidates, criterion)
    best = np.lexsort((candidates, np.abs(candidates - 0.5), -np.round(values, 12)))[0]
    return float(candidates[best])


def multilabel_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    thresholds: float | Sequence[float] = 0.5,
) -> dict:
    """Per-label binary metrics over [N, K] label and score matrices, and scores averaged over labels.

    - ``f1_weighted_macro``: each label's macro F1 (mean of its positive- and negative-class F1),
      weighted by its positive count; the official SemEval-2022 MAMI sub-task B score when given the
      four type labels (``compute_scoreB`` of the task's ``evaluation.py``);
    - ``f1_macro`` / ``f1_weighted``: positive-class F1 per label, plain mean / weighted by each
      label's positive count (scikit-learn ``f1_score(average=...)`` on the indicator matrix);
    - ``auroc``: mean of the per-label AUROCs; None (``auroc_reason`` says why) if a label has one class;
    - ``per_label``: ``{name: {auroc, auroc_reason, f1, f1_macro, precision, recall, support,
      accuracy, threshold, positive_rate}}``, where ``f1``, ``precision`` and ``recall`` are the
      positive class's and ``support`` its count.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape or y.shape[1] != len(names):
        raise ValueError(
            f"labels and scores must both be [N, {len(names)}] for labels {list(names)}; "
            f"got {y.shape} and {s.shape}"
        )
    cuts = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(names),))
    per_label = {name: _label_summary(y[:, k], s[:, k], float(cuts[k])) for k, name in enumerate(names)}
    positive_f1 = np.array([m["f1"] for m in per_label.values()])
    macro_f1 = np.array([m["f1_macro"] for m in per_label.values()])
    support = np.array([m["support"] for m in per_label.values()])
    total = support.sum()
    one_class = [name for name, m in per_label.items() if m["auroc"] is None]
    return {
        "num_samples": int(y.shape[0]),
        "labels": list(names),
        "f1_weighted_macro": float(macro_f1 @ support / total) if total else 0.0,
        "f1_macro": float(positive_f1.mean()),
        "f1_weighted": float(positive_f1 @ support / total) if total else 0.0,
        "auroc": None if one_class else float(np.mean([m["auroc"] for m in per_label.values()])),
        "auroc_reason": f"labels {one_class} have one class only" if one_class else None,
        "per_label": per_label,
    }


def _label_summary(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """One label's binary metrics, flat: the positive class's precision, recall and F1."""
    m = binary_metrics(labels, scores, threshold)
    positive = m["per_class"]["1"]
    return {
        "auroc": m["auroc"],
        "auroc_reason": m["auroc_reason"],
        "f1": positive["f1"],
        "f1_macro": m["f1_macro"],
        "precision": positive["precision"],
        "recall": positive["recall"],
        "support": positive["support"],
        "accuracy": m["accuracy"],
        "threshold": m["threshold"],
        "positive_rate": m["positive_rate"],
    }


def _binary_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape or len(y) == 0:
        raise ValueError(
            f"labels and scores must be non-empty 1-d arrays of one length; got {y.shape}, {s.shape}"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1; drop unlabeled (-1) samples before computing metrics")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int(np.sum(~np.isfinite(s)))} non-finite values")
    return y.astype(np.int64), s


def _auroc(y: np.ndarray, s: np.ndarray) -> tuple[float | None, str | None]:
    present = np.unique(y)
    if len(present) < 2:
        return None, f"only class {int(present[0])} present in {len(y)} labels; AUROC needs both classes"
    return float(roc_auc_score(y, s)), None


def _criterion_at(y: np.ndarray, s: np.ndarray, cuts: np.ndarray, criterion: str) -> np.ndarray:
    """``criterion`` at every cut at once, from confusion counts via a sort and cumulative sums."""
    order = np.argsort(s, kind="stable")
    positives_below = np.concatenate([[0], np.cumsum(y[order])])
    below = np.searchsorted(s[order], cuts, side="left")  # predicted negative: score < cut
    fn = positives_below[below]
    tn = below - fn
    tp = y.sum() - fn
    fp = (len(y) - y.sum()) - tn
    if criterion == "accuracy":
        return (tp + tn) / len(y)
    return (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
