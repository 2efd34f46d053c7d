"""What a classifying method predicts and how it is scored: shared by every method with a classifier."""

from __future__ import annotations

import torch
from torch import Tensor

from memetrain.errors import ConfigError
from memetrain.losses import focal_loss, masked_bce
from memetrain.methods.registry import DataInfo

LOSSES = ("bce", "focal")


class ClassificationObjective:
    """Logits ``[B, len(targets)]`` against the label columns ``targets`` (the data's main label by
    default), scored with binary cross-entropy or focal loss; missing labels (-1) never count."""

    def __init__(self, data: DataInfo, targets: list[str] | None, loss: str, focal_gamma: float):
        self.targets = list(targets or [data.main_label])
        unknown = [name for name in self.targets if name not in data.label_names]
        if unknown:
            raise ConfigError(
                f"method.targets {unknown} are not labels of this data; it has {data.label_names}"
            )
        if loss not in LOSSES:
            raise ConfigError(f"method.loss={loss!r}: choose {' or '.join(LOSSES)}")
        self.index = [data.label_names.index(name) for name in self.targets]
        self.loss, self.focal_gamma = loss, focal_gamma

    def __call__(self, logits: Tensor, labels: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({"cls_loss"}, {"accuracy"})`` for ``logits`` and the batch's ``labels`` ``[B, K]``;
        accuracy is of the first target, over the memes that have it."""
        targets = labels[:, self.index]  # [B, targets]
        if self.loss == "focal":
            loss = focal_loss(logits, targets, gamma=self.focal_gamma)
        else:
            loss = masked_bce(logits, targets)
        with torch.no_grad():
            labeled = targets[:, 0] >= 0
            correct = ((logits[:, 0] > 0).long() == targets[:, 0])[labeled]
            accuracy = correct.float().mean() if labeled.any() else logits.new_zeros(())
        return {"cls_loss": loss}, {"accuracy": accuracy}
