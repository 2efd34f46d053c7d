"""Binary and multi-label classification losses that ignore missing labels (-1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over the labeled entries.

    logits, targets: [B, K]; targets in {0, 1}, or -1 where a label is missing (never counted).
    """
    mask = targets >= 0
    losses = F.binary_cross_entropy_with_logits(
        logits.float(), targets.clamp(min=0).float(), reduction="none"
    )
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", 2017) over labeled entries.

    ``alpha`` weights the positive class (``1 - alpha`` the negative); ``None`` leaves both at 1.
    logits, targets: [B, K]; targets -1 are ignored.
    """
    mask = targets >= 0
    labels = targets.clamp(min=0).float()
    ce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    p_true = torch.exp(-ce)  # probability given to the true class
    losses = (1 - p_true) ** gamma * ce
    if alpha is not None:
        losses = losses * (alpha * labels + (1 - alpha) * (1 - labels))
    return (losses * mask).sum() / mask.sum().clamp(min=1)
