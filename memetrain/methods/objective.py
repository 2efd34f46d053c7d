"""What a classifying method predicts and how it is scored: shared by every method with a classifier."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memetrain.errors import ConfigError
from memetrain.losses import focal_loss, masked_bce
from memetrain.losses.resample import ResampleLoss
from memetrain.methods.base import Batch, valid_rows
from memetrain.methods.registry import DataInfo

LOSSES = ("bce", "focal", "resample")


class ClassificationObjective:
    """Logits ``[B, len(targets)]`` against the label columns ``targets`` (the data's main label by
    default), scored with binary cross-entropy or focal loss; missing labels (-1) never count.

    The loss is the mean over every labeled (meme, target) entry, or with ``sum_over_targets`` the
    sum over targets of each target's mean over its labeled memes (a multi-task sum of one loss per
    output, as TIB-VA trains its five MAMI heads). A row that is not valid (:func:`valid_rows`)
    counts as unlabeled, in the loss and in the accuracies.
    """

    def __init__(
        self,
        data: DataInfo,
        targets: list[str] | None,
        loss: str,
        focal_gamma: float,
        sum_over_targets: bool = False,
        resample: Mapping[str, Any] | None = None,
    ):
        self.targets = list(targets or [data.main_label])
        unknown = [name for name in self.targets if name not in data.label_names]
        if unknown:
            raise ConfigError(
                f"method.targets {unknown} are not labels of this data; it has {data.label_names}"
            )
        if loss not in LOSSES:
            raise ConfigError(f"method.loss={loss!r}: choose {' or '.join(LOSSES)}")
        self.index = [data.label_names.index(name) for name in self.targets]
        self.loss, self.focal_gamma, self.sum_over_targets = loss, focal_gamma, sum_over_targets
        self.resample = ResampleLoss(len(self.targets), **(resample or {})) if loss == "resample" else None

    def observe_labels(self, labels: np.ndarray, label_names: list[str]) -> None:
        """``labels`` ``[N, L]`` (every label column, -1 missing) of the labeled memes the run trains
        on: the resample loss counts each target's positives among them."""
        if self.resample is None:
            return
        columns = np.asarray(labels)[:, [label_names.index(name) for name in self.targets]]  # [N, K]
        labeled = (columns >= 0).all(axis=1)
        positives = torch.as_tensor((columns[labeled] == 1).sum(axis=0))
        self.resample.set_counts(positives, int(labeled.sum()), self.targets)

    def targets_of(self, batch: Batch) -> Tensor:
        """The labels of the targets ``[B, len(targets)]``: -1 where missing and on every row that is
        not valid."""
        targets = batch["labels"][:, self.index]  # [B, len(targets)]
        valid = valid_rows(batch)
        return targets if valid is None else targets.masked_fill(~valid[:, None], -1)

    def loss_of(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The configured loss of ``logits`` against ``targets`` (both ``[B, len(targets)]``)."""
        if self.sum_over_targets:
            return sum(self._loss(logits[:, [k]], targets[:, [k]]) for k in range(targets.shape[1]))
        return self._loss(logits, targets)

    def __call__(self, logits: Tensor, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({"cls_loss"}, {"accuracy", ...})`` for ``logits`` of the memes of ``batch``;
        ``accuracy`` is of the first target, over the valid memes that have it, and with several
        targets ``accuracy_<target>`` is each one's."""
        targets = self.targets_of(batch)  # [B, targets]
        return {"cls_loss": self.loss_of(logits, targets)}, accuracies(logits, targets, self.targets)

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.resample is not None:
            if self.sum_over_targets:
                raise ConfigError(
                    "method.loss=resample weighs the targets together; it cannot sum them one by one"
                )
            return self.resample(logits, targets)
        if self.loss == "focal":
            return focal_loss(logits, targets, gamma=self.focal_gamma)
        return masked_bce(logits, targets)


@torch.no_grad()
def accuracies(logits: Tensor, targets: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Accuracy at logit 0 of each target over its labeled memes (0 when none is labeled)."""
    labeled = targets >= 0
    correct = ((logits > 0).long() == targets) & labeled
    per_target = correct.sum(0).float() / labeled.sum(0).clamp(min=1)  # [targets]
    report = {"accuracy": per_target[0]}
    if len(names) > 1:
        report |= {f"accuracy_{name}": per_target[k] for k, name in enumerate(names)}
    return report
