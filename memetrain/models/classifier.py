"""A meme classifier: an image encoder, a text encoder or both, and a head that reads their features."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from memetrain.errors import ConfigError


class Classifier(nn.Module):
    """Encoders and a head, fed a stream batch (``image`` uint8 ``[B, 3, H, W]``; ``input_ids`` and
    ``attention_mask`` ``[B, L]``).

    With one encoder the head is unimodal (:mod:`memetrain.models.heads`) and gets that feature;
    with both it is a fusion head (:mod:`memetrain.models.fusion`) and gets ``(image, text)``.
    This covers the image-only (ResNet-50, ViT-B/16, VGG16), text-only (LSTM, transformer) and
    multimodal (late, concat, align, cross) baselines.
    """

    def __init__(
        self, head: nn.Module, image_encoder: nn.Module | None = None, text_encoder: nn.Module | None = None
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.head = head

    def encode(self, batch: dict[str, Any]) -> list[Tensor]:
        """The encoders' features, image first: ``[B, Di]`` and/or ``[B, Dt]``."""
        features = []
        if self.image_encoder is not None:
            if "image" not in batch:
                raise ConfigError(
                    "the classifier needs batch['image'] (one view per sample), but the stream gives "
                    f"{sorted(batch)}; use a single-view transform (resize or assignment) for this data"
                )
            features.append(self.image_encoder(batch["image"]))
        if self.text_encoder is not None:
            if "input_ids" not in batch:
                raise ConfigError(
                    "the classifier's text encoder needs batch['input_ids']; give the data a tokenizer"
                )
            features.append(self.text_encoder(batch["input_ids"], batch["attention_mask"]))
        return features

    def embed(self, batch: dict[str, Any]) -> Tensor:
        """The representation the output layer reads, ``[B, head.embed_dim]`` (t-SNE, kNN, linear probe)."""
        return self.head.embed(*self.encode(batch))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.head(*self.encode(batch))  # [B, num_outputs]
