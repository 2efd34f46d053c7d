"""Every plot writes a real PNG that matplotlib reads back, and leaves no figure open."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from memetrain.eval import plot_confusion, plot_curves, plot_roc, plot_tsne

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= 300
    assert image[..., :3].std() > 0.01  # something was drawn
    assert plt.get_fignums() == []


def test_plot_curves(tmp_path):
    history = [
        {"step": step, "train/loss": 1 / step, "train/accuracy": 1 - 1 / step}
        | ({"val/loss": 1.2 / step, "val/accuracy": 0.9 - 1 / step} if step % 5 == 0 else {})
        for step in range(1, 31)
    ]
    assert_png(plot_curves(history, tmp_path / "curves.png"))
    assert_png(plot_curves([{"train/loss": 0.5}, {"train/loss": 0.4}], tmp_path / "loss_only.png"))


def test_plot_roc(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100)
    assert_png(plot_roc(labels, np.clip(labels * 0.3 + rng.random(100) * 0.7, 0, 1), tmp_path / "roc.png"))
    assert_png(plot_roc(np.ones(5), rng.random(5), tmp_path / "one_class.png"))


@pytest.mark.parametrize("n", [60, 5])
def test_plot_tsne(tmp_path, n):
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 2, n)
    features = rng.normal(size=(n, 8)) + labels[:, None]
    assert_png(plot_tsne(features, labels, tmp_path / "sub" / "tsne.png", seed=0))


def test_plot_confusion(tmp_path):
    path = plot_confusion([[30, 5], [8, 12]], tmp_path / "cm.png", class_names=["benign", "hateful"])
    assert path == tmp_path / "cm.png"
    assert_png(path)
