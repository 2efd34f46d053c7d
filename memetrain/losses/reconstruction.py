"""Cross-modal reconstruction: predict each modality's feature from the other's."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_reconstruction_loss(
    text_from_image: Tensor, text: Tensor, image_from_text: Tensor, image: Tensor
) -> dict[str, Tensor]:
    """Mean squared errors ``[]`` of both directions, and their sum as ``reconstruction_loss``.

    All inputs ``[B, D]``; the targets are detached (they are the frozen features to predict).
    """
    image_to_text = F.mse_loss(text_from_image, text.detach())
    text_to_image = F.mse_loss(image_from_text, image.detach())
    return {
        "reconstruction_loss": image_to_text + text_to_image,
        "image_to_text_mse": image_to_text.detach(),
        "text_to_image_mse": text_to_image.detach(),
    }
