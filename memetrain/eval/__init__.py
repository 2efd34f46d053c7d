"""Evaluation: metrics, label fractions, feature probes (linear, kNN) and report plots."""

from memetrain.eval.fractions import label_fraction_indices
from memetrain.eval.metrics import best_threshold, binary_metrics, multilabel_metrics
from memetrain.eval.plots import plot_confusion, plot_curves, plot_roc, plot_tsne
from memetrain.eval.probe import ProbeResult, knn_scores, linear_probe

__all__ = [
    "ProbeResult",
    "best_threshold",
    "binary_metrics",
    "knn_scores",
    "label_fraction_indices",
    "linear_probe",
    "multilabel_metrics",
    "plot_confusion",
    "plot_curves",
    "plot_roc",
    "plot_tsne",
]
