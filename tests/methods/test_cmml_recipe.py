"""CMML-CLIP as the SemiMemes study's code runs it (FPTU-Thesis-CSAI/SemiMemes src/CmmlTrain.py,
src/model/CmmlLayer.py, src/loss.py 241-255): linear encoders and heads, the attention MLP
256-64-32-1, the cosine over the sigmoid outputs, fused weight 2 and no diversity term; the
consistency term against that code's formula written out here."""

from __future__ import annotations

import math

import pytest
import torch

from memetrain.losses.consistency import robust_consistency_loss
from memetrain.methods import DataInfo, build_method
from tests.methods.test_clip import SMALL, meme_batch

MAMI_B = DataInfo(["misogynous", "shaming", "stereotype", "objectification", "violence"], "misogynous", 50)
PAPER = dict(
    hidden_dim=8, encoder="linear", attention_hidden=[4, 2], prediction_vector="sigmoid",
    fused_weight=2.0, diversity_weight=0.0, targets=["shaming", "stereotype", "objectification", "violence"],
)  # fmt: skip


def naive_consistency(first: list[list[float]], second: list[list[float]], cita: float) -> float:
    """SemiMemes' consistency_measurement: d = 2 - cos over the K outputs; d^2 / 2 below cita, else
    cita (|d| - cita / 2); summed and divided by the batch."""
    total = 0.0
    for a, b in zip(first, second):
        cos = sum(x * y for x, y in zip(a, b)) / (
            math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        )
        d = 2 - cos
        total += d * d / 2 if abs(d) < cita else cita * (abs(d) - cita / 2)
    return total / len(first)


def test_consistency_over_the_sigmoid_outputs_matches_the_studys_formula():
    g = torch.Generator().manual_seed(0)
    first, second = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    first[0] = second[0]  # d = 1 < 1.003: the quadratic part
    loss = robust_consistency_loss(first, second, torch.ones(5, dtype=torch.bool), 1.003, two_class=False)
    assert loss.item() == pytest.approx(naive_consistency(first.tolist(), second.tolist(), 1.003), rel=1e-6)


def test_the_studys_network(clip_weights):
    method = build_method(
        "cmml", {"clip": {"weights": str(clip_weights[0]), "embed_dim": 16}, **PAPER}, SMALL, MAMI_B
    )
    for encoder in (method.image_encoder, method.text_encoder):
        assert isinstance(encoder, torch.nn.Linear) and encoder.weight.shape == (8, 16)
    linears = [m for m in method.attention.score if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(4, 8), (2, 4), (1, 2)]
    batch = {**meme_batch(), "labels": torch.tensor([[1, 1, 0, 0, 1]] * 3 + [[-1] * 5] * 3)}
    losses, _ = method.training_step(batch)
    out = method.outputs(batch)
    targets = method.objective.targets_of(batch)
    fused = method.objective.loss_of(out.fused, targets)
    torch.testing.assert_close(losses["cls_loss"], 2.0 * fused)
    assert losses["diversity_loss"].item() == 0.0
    p_image, p_text = out.image.sigmoid()[3:], out.text.sigmoid()[3:]  # the unlabeled memes
    expected = naive_consistency(p_image.tolist(), p_text.tolist(), 1.003)
    assert losses["consistency_loss"].item() == pytest.approx(expected, rel=1e-5)
