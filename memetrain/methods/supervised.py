"""Supervised classification: the image-only, text-only and fusion baselines, and fine-tuning.

The model is a :class:`memetrain.models.Classifier` (encoders from ``model.image`` / ``model.text``
and a unimodal or fusion head); the loss is binary cross-entropy, or focal loss, per target label.
``init`` starts an encoder from our own weights (a pretraining run's ``model.safetensors``, with the
prefix its encoder has there): that is the full fine-tune protocol.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from memetrain.methods.base import Batch, Method
from memetrain.methods.objective import ClassificationObjective
from memetrain.methods.registry import DataInfo, register
from memetrain.models import build_classifier
from memetrain.models.weights import load_encoder_inits


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
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma)
        self.targets = self.objective.targets
        self.model = build_classifier(num_outputs=len(self.targets), **data.complete(model))
        load_encoder_inits({"image": self.model.image_encoder, "text": self.model.text_encoder}, init)

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.objective(self.model(batch), batch)

    def embed(self, batch: Batch) -> Tensor:
        return self.model.embed(batch)

    def predict(self, batch: Batch) -> Tensor:
        return self.model(batch)

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        features = self.model.encode(batch)  # the encoders once for both
        return self.model.head.embed(*features), self.model.head(*features)
