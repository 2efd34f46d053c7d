"""The SemiMemes MAMI metric by hand (FPTU-Thesis-CSAI/SemiMemes src/evaluation_metric/f1_metric.py
55-75: per task-B label the two-class macro F1 at 0.5, weighted by the label's positive count),
which our multilabel f1_weighted_macro reports."""

from __future__ import annotations

import numpy as np
import pytest

from memetrain.eval.metrics import multilabel_metrics


def test_two_labels_by_hand():
    # label a: truth [1, 1, 0, 0], predicted [1, 0, 0, 0]: class 1 F1 = 2/3 (tp 1, fn 1), class 0 F1 =
    #   2 x (2/3 x 1) / (2/3 + 1) = 0.8 (tp 2, fp 1); macro (2/3 + 0.8) / 2 = 11/15; 2 positives.
    # label b: truth [1, 0, 0, 0], predicted [1, 1, 0, 0]: class 1 F1 = 2/3 (tp 1, fp 1), class 0 F1 =
    #   0.8 (tp 2, fn 1); macro 11/15; 1 positive. Weighted: (2 x 11/15 + 1 x 11/15) / 3 = 11/15.
    # label c: truth [1, 1, 1, 0], predicted [0, 0, 0, 0]: class 1 F1 = 0, class 0 F1 = 2 x (1/4 x 1) /
    #   (1/4 + 1) = 0.4; macro 0.2; 3 positives. All three: (2 x 11/15 + 11/15 + 3 x 0.2) / 6 = 0.4667.
    truth = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.2], [0.1, 0.3, 0.4], [0.4, 0.2, 0.3]])
    m = multilabel_metrics(truth, scores, ["a", "b", "c"], 0.5)
    assert m["f1_weighted_macro"] == pytest.approx((2 * 11 / 15 + 11 / 15 + 3 * 0.2) / 6)
    assert m["per_label"]["c"]["f1_macro"] == pytest.approx(0.2)
