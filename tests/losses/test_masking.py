"""Losses with a validity mask against naive loops over the rows that count: a row marked invalid
(a copy of another meme standing in for a bad one) changes neither a loss, nor its gradient with
respect to the valid rows, nor DINO's center; and the masked mean itself by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memetrain.losses import cross_reconstruction_loss
from memetrain.losses.agreement import cosine_agreement_loss, variance_hinge
from memetrain.losses.contrastive import ClipLoss
from memetrain.losses.dino import DinoLoss
from memetrain.losses.masking import masked_mean
from tests.methods.test_cass import naive_agreement
from tests.methods.test_clip import naive_clip_loss
from tests.methods.test_dino import naive_dino_loss

VALID = torch.tensor([True, False, True, True, False, True, True])  # rows 1 and 4 stand in
KEPT = [0, 2, 3, 5, 6]
STAND_INS = {1: 3, 4: 0}  # row 1 holds a copy of row 3, row 4 a copy of row 0


def with_stand_ins(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``x`` with the stand-in rows (along ``dim``) overwritten by copies of their source rows."""
    x = x.clone()
    for row, source in STAND_INS.items():
        x.select(dim, row).copy_(x.select(dim, source))
    return x


def test_masked_mean_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, math.nan])
    assert masked_mean(values, torch.tensor([True, False, True, False])).item() == 2.0  # the NaN never counts
    assert masked_mean(values[:3], None).item() == 2.0
    grid = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0]])
    rows = torch.tensor([[True], [False], [True]])  # [3, 1] against [3, 2]
    assert masked_mean(grid, rows, dim=0).tolist() == [4.0, 6.5]
    assert masked_mean(grid, rows).item() == 21 / 4
    nothing = torch.ones(3, requires_grad=True)
    empty = masked_mean(nothing, torch.zeros(3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and nothing.grad.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_over_valid_rows_is_the_loss_of_those_rows_alone(local_loss):
    torch.manual_seed(0)
    images = with_stand_ins(F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)).requires_grad_()
    texts = with_stand_ins(F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)).requires_grad_()
    terms = ClipLoss(local_loss)(images, texts, torch.tensor(12.5), valid=VALID)
    grads = torch.autograd.grad(terms["contrastive_loss"], (images, texts))
    reference = naive_clip_loss(images[KEPT], texts[KEPT], 12.5)  # duplicates gone: no false negatives
    expected = torch.autograd.grad(reference, (images, texts))
    assert terms["contrastive_loss"].item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(grads, expected):  # the stand-ins' rows get no gradient
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)
    similarity = images[KEPT] @ texts[KEPT].T
    right = sum(int(similarity[i].argmax() == i) for i in range(len(KEPT)))
    assert terms["i2t_top1"].item() == pytest.approx(right / len(KEPT))


def test_clip_loss_with_every_row_valid_is_the_unmasked_loss():
    torch.manual_seed(1)
    images, texts = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    unmasked = ClipLoss()(images, texts, torch.tensor(30.0))
    masked = ClipLoss()(images, texts, torch.tensor(30.0), valid=torch.ones(6, dtype=torch.bool))
    for name, value in unmasked.items():
        torch.testing.assert_close(masked[name], value)


def test_dino_loss_and_center_over_valid_rows():
    generator = torch.Generator().manual_seed(0)
    student = with_stand_ins(torch.randn(4, 7, 11, generator=generator) * 3, dim=1).requires_grad_()
    teacher = with_stand_ins(torch.randn(2, 7, 11, generator=generator) * 3, dim=1)
    loss = DinoLoss(out_dim=11, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, 11, generator=generator))
    center = loss.center[0].clone()
    terms = loss(student, teacher, teacher_temp=0.04, valid=VALID)
    expected = naive_dino_loss(
        student[:, KEPT].double(), teacher[:, KEPT].double(), center.double(), 0.1, 0.04
    )
    assert terms["dino_loss"].item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(terms["dino_loss"], student)
    assert grad[:, ~VALID].abs().max() == 0  # the stand-ins teach nothing

    loss.update_center(teacher, valid=VALID)
    rows = [teacher[t, b] for t in range(2) for b in KEPT]
    mean = [sum(row[k].item() for row in rows) / len(rows) for k in range(11)]
    assert loss.center[0].tolist() == pytest.approx(
        [0.9 * c + 0.1 * m for c, m in zip(center.tolist(), mean)]
    )
    before = loss.center.clone()
    loss.update_center(teacher, valid=torch.zeros(7, dtype=torch.bool))  # nothing valid: unchanged
    assert torch.equal(loss.center, before)


def naive_variance_hinge(z: torch.Tensor, target: float = 0.5) -> float:
    """Each row normalised, then per dimension the unbiased variance over rows, in plain Python."""
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in z.tolist()]
    n, d = len(rows), len(rows[0])
    total = 0.0
    for k in range(d):
        mean = sum(row[k] for row in rows) / n
        var = sum((row[k] - mean) ** 2 for row in rows) / (n - 1)
        total += max(0.0, target - math.sqrt(var + 1e-4) * math.sqrt(d))
    return total / d


def test_agreement_and_variance_hinge_over_valid_rows():
    generator = torch.Generator().manual_seed(2)
    a = with_stand_ins(torch.randn(7, 6, generator=generator))
    b = with_stand_ins(torch.randn(7, 6, generator=generator))
    got = cosine_agreement_loss(a, b, VALID).item()
    assert got == pytest.approx(naive_agreement(a[KEPT], b[KEPT]), abs=1e-6)
    narrow = with_stand_ins(torch.randn(7, 6, generator=generator) * 0.1 + 1)  # unit rows close together
    got = variance_hinge(narrow, valid=VALID).item()
    assert got == pytest.approx(naive_variance_hinge(narrow[KEPT]), abs=1e-6)
    assert got > 0.1  # the hinge is active
    assert variance_hinge(narrow).item() == pytest.approx(naive_variance_hinge(narrow), abs=1e-6)


def test_reconstruction_over_valid_rows():
    generator = torch.Generator().manual_seed(3)
    a, b, c, d = (with_stand_ins(torch.randn(7, 3, generator=generator)) for _ in range(4))
    terms = cross_reconstruction_loss(a, b, c, d, VALID)

    def naive_mse(x, y):
        return sum((x[r, k] - y[r, k]).item() ** 2 for r in KEPT for k in range(3)) / (len(KEPT) * 3)

    assert terms["image_to_text_mse"].item() == pytest.approx(naive_mse(a, b), rel=1e-6)
    assert terms["text_to_image_mse"].item() == pytest.approx(naive_mse(c, d), rel=1e-6)
