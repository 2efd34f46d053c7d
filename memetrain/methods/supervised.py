"""Supervised classification: the image-only, text-only and fusion baselines, and fine-tuning.

The model is a :class:`memetrain.models.Classifier` (encoders from ``model.image`` / ``model.text``
and a unimodal or fusion head); the loss is binary cross-entropy, or focal loss, per target label.
``init`` starts an encoder from our own weights (a pretraining run's ``model.safetensors``, with the
prefix its encoder has there): that is the full fine-tune protocol.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memetrain.errors import ConfigError
from memetrain.losses import focal_loss, masked_bce
from memetrain.methods.base import Batch, Method
from memetrain.methods.registry import DataInfo, register
from memetrain.models import build_classifier, load_weights


@register
class Supervised(Method):
    name = "supervised"
    needs_labels = True

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        init: dict[str, dict[str, str] | None] | None = None,
    ):
        super().__init__()
        self.targets = list(targets or [data.main_label])
        unknown = [name for name in self.targets if name not in data.label_names]
        if unknown:
            raise ConfigError(
                f"method.targets {unknown} are not labels of this data; it has {data.label_names}"
            )
        if loss not in ("bce", "focal"):
            raise ConfigError(f"method.loss={loss!r}: choose bce or focal")
        self.target_index = [data.label_names.index(name) for name in self.targets]
        self.loss, self.focal_gamma = loss, focal_gamma
        self.model = build_classifier(num_outputs=len(self.targets), **data.complete(model))
        for part, spec in (init or {}).items():
            if spec is not None:
                encoder = getattr(self.model, f"{part}_encoder", None)
                if encoder is None:
                    raise ConfigError(f"method.init.{part} is set but the model has no {part} encoder")
                load_weights(encoder, spec["path"], spec["prefix"])

    def _targets(self, batch: Batch) -> Tensor:
        return batch["labels"][:, self.target_index]

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits = self.model(batch)  # [B, targets]
        targets = self._targets(batch)
        if self.loss == "focal":
            loss = focal_loss(logits, targets, gamma=self.focal_gamma)
        else:
            loss = masked_bce(logits, targets)
        with torch.no_grad():
            main = targets[:, 0] >= 0
            correct = ((logits[:, 0] > 0).long() == targets[:, 0])[main]
            accuracy = correct.float().mean() if main.any() else logits.new_zeros(())
        return {"cls_loss": loss}, {"accuracy": accuracy}

    def embed(self, batch: Batch) -> Tensor:
        return self.model.embed(batch)

    def predict(self, batch: Batch) -> Tensor:
        return self.model(batch)
