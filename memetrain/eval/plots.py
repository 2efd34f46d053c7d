"""PNG plots for run reports: training curves, ROC, t-SNE of embeddings, confusion matrix.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg backend on save,
never through pyplot, so no figure stays registered after its function returns and nothing
touches the global backend. Each file is written atomically, and its path is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from sklearn.metrics import roc_auc_score, roc_curve

from memetrain.fileio import atomic_writer

UNLABELED_COLOR = "0.6"


def plot_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Loss (left) and accuracy (right) against step, for whichever of train/val were logged.

    Rows look like {"step": 100, "train/loss": 0.4, "val/loss": 0.5, "val/accuracy": 0.8};
    a row may omit any key, and rows without "step" are numbered by position.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for split in ("train", "val"):
            key = f"{split}/{metric}"
            points = [
                (row.get("step", i), row[key]) for i, row in enumerate(history) if row.get(key) is not None
            ]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 50 else None, label=split)
        ax.set(xlabel="step", ylabel=metric, title=metric)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: str | Path) -> Path:
    """ROC curve of 0/1 labels against class-1 scores, with the AUROC in the legend."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color=UNLABELED_COLOR, label="chance")
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"AUROC = {roc_auc_score(labels, scores):.3f}")
    else:
        ax.set_title("ROC undefined: only one class present")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_tsne(
    features: np.ndarray, labels: np.ndarray, path: str | Path, seed: int, perplexity: float = 30.0
) -> Path:
    """2-d t-SNE of [N, D] features (PCA init, seeded), coloured by label, unlabeled (-1) in grey.

    The perplexity is clipped to N - 1, which t-SNE requires for small N.
    """
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    if features.ndim != 2 or len(features) < 2 or len(labels) != len(features):
        raise ValueError(
            f"t-SNE needs [N >= 2, D] features and N labels; got {features.shape} and {labels.shape}"
        )
    tsne = TSNE(n_components=2, perplexity=min(perplexity, len(features) - 1), init="pca", random_state=seed)
    points = tsne.fit_transform(features)
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.subplots()
    for label in np.unique(labels):
        mask = labels == label
        unlabeled = label == -1
        ax.scatter(
            *points[mask].T,
            s=12,
            alpha=0.8,
            color=UNLABELED_COLOR if unlabeled else None,
            label="unlabeled" if unlabeled else f"label {label}",
        )
    ax.set(xticks=[], yticks=[], title="t-SNE")
    ax.legend()
    return _save(fig, path)


def plot_confusion(
    cm: Sequence[Sequence[int]], path: str | Path, class_names: Sequence[str] | None = None
) -> Path:
    """Confusion matrix (rows true, columns predicted) as a heat map with counts in the cells."""
    cm = np.asarray(cm)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    fig = Figure(figsize=(4.5, 4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    for (row, col), count in np.ndenumerate(cm):
        dark = count > cm.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    ticks = range(len(names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=names, yticklabels=names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path
