"""Cross-modal reconstruction: predict each modality's feature from the other's."""

from __future__ import annotations

from torch import Tensor

from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


@in_float32
def cross_reconstruction_loss(
    text_from_image: Tensor,
    text: Tensor,
    image_from_text: Tensor,
    image: Tensor,
    valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """Mean squared errors ``[]`` of both directions, and their sum as ``reconstruction_loss``.

    All inputs ``[B, D]``; the targets are detached (they are the frozen features to predict).
    ``valid`` (bool ``[B]``, default all) selects the rows averaged over.
    """
    rows = None if valid is None else valid[:, None]  # [B, 1]
    image_to_text = masked_mean((text_from_image - text.detach()) ** 2, rows)  # [B, D] -> []
    text_to_image = masked_mean((image_from_text - image.detach()) ** 2, rows)  # [B, D] -> []
    return {
        "reconstruction_loss": image_to_text + text_to_image,
        "image_to_text_mse": image_to_text.detach(),
        "text_to_image_mse": text_to_image.detach(),
    }
