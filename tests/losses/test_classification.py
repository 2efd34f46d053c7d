"""The classification losses against values written out by hand (math, not torch's BCE): focal loss
at the paper's gamma 2 and alpha 0.25, and the masked BCE it reduces to, with missing labels (-1)."""

from __future__ import annotations

import math

import pytest
import torch

from memetrain.losses import focal_loss, masked_bce

LOGITS = [[0.0, 2.0, -1.5], [1.0, -0.5, 3.0]]
TARGETS = [[1, 0, -1], [0, 1, 1]]  # one missing label: five entries count


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_by_hand(gamma: float, alpha: float | None) -> float:
    """Lin et al. 2017, eq. 5 per entry: -alpha_t (1 - p_t)^gamma log p_t, averaged over labeled entries."""
    terms = []
    for row_logits, row_targets in zip(LOGITS, TARGETS):
        for x, y in zip(row_logits, row_targets):
            if y < 0:
                continue
            p_t = sigmoid(x) if y == 1 else 1 - sigmoid(x)
            alpha_t = 1.0 if alpha is None else (alpha if y == 1 else 1 - alpha)
            terms.append(-alpha_t * (1 - p_t) ** gamma * math.log(p_t))
    return sum(terms) / len(terms)


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (2.0, None), (0.5, 0.75)])
def test_focal_loss_equals_the_papers_formula(gamma, alpha):
    got = focal_loss(torch.tensor(LOGITS), torch.tensor(TARGETS), gamma=gamma, alpha=alpha)
    assert got.item() == pytest.approx(focal_by_hand(gamma, alpha), rel=1e-6)


def test_focal_loss_at_gamma_2_alpha_025_on_one_entry():
    # x = 0, y = 1: p_t = 1/2, so 0.25 * (1/2)^2 * log 2 = log(2) / 16
    got = focal_loss(torch.tensor([[0.0]]), torch.tensor([[1]]), gamma=2.0, alpha=0.25)
    assert got.item() == pytest.approx(math.log(2) / 16, rel=1e-6)


def test_focal_loss_without_focusing_or_weights_is_the_masked_bce():
    by_hand = focal_by_hand(gamma=0.0, alpha=None)
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    assert masked_bce(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)
    assert focal_loss(logits, targets, gamma=0.0, alpha=None).item() == pytest.approx(by_hand, rel=1e-6)


def test_focal_loss_down_weights_the_easy_entries():
    """An entry classified right with confidence 0.95 loses (1 - 0.95)^2 = 1/400 of its BCE, one at
    0.6 only (0.4)^2: the focusing the loss is for."""
    easy, hard = math.log(0.95 / 0.05), math.log(0.6 / 0.4)
    ratio = [
        (focal_loss(torch.tensor([[x]]), torch.tensor([[1]]), gamma=2.0, alpha=None)
         / masked_bce(torch.tensor([[x]]), torch.tensor([[1]]))).item()
        for x in (easy, hard)
    ]  # fmt: skip
    assert ratio == pytest.approx([0.05**2, 0.4**2], rel=1e-5)
