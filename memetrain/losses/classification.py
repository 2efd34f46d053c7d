"""Binary and multi-label classification losses that ignore missing labels (-1).

A row that counts in no loss (``batch["valid"]`` False) is given the label -1 by the caller
(:meth:`memetrain.methods.objective.ClassificationObjective.targets_of`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


@in_float32
def masked_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over the labeled entries.

    logits, targets: [B, K]; targets in {0, 1}, or -1 where a label is missing (never counted).
    """
    losses = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).float(), reduction="none")
    return masked_mean(losses, targets >= 0)  # [B, K] -> []


@in_float32
def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", 2017) over labeled entries.

    ``alpha`` weights the positive class (``1 - alpha`` the negative); ``None`` leaves both at 1.
    logits, targets: [B, K]; targets -1 are ignored.
    """
    labels = targets.clamp(min=0).float()
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_true = torch.exp(-ce)  # probability given to the true class
    losses = (1 - p_true) ** gamma * ce
    if alpha is not None:
        losses = losses * (alpha * labels + (1 - alpha) * (1 - labels))
    return masked_mean(losses, targets >= 0)  # [B, K] -> []
