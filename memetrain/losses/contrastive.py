"""Image-text contrastive loss (CLIP) and the cross-rank feature gather it needs.

The gather is a free function, kept apart from the loss math, and both fall back to one process
when ``torch.distributed`` is not initialised, so the loss runs and is tested on one CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def world_size() -> int:
    """Processes in the default group; 1 when ``torch.distributed`` is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when ``torch.distributed`` is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated in rank order: ``[B, ...]`` to ``[world * B, ...]``.

    Gradients flow back to each rank's own slice (the backward of the all-gather sums, over ranks,
    the gradients that reach that slice), so a loss over the gathered batch trains every rank's
    encoders. Every rank must pass the same shape. With one process, ``x`` itself.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over image-text pairs (Radford et al., "Learning Transferable Visual Models
    From Natural Language Supervision", ICML 2021, fig. 3), in open_clip's formulation (Ilharco et
    al. 2021; Cherti et al., "Reproducible scaling laws for contrastive language-image learning", 2023).

    Row ``i`` of ``image_features`` and of ``text_features`` come from the same meme; every other
    text (image) of the global batch is a negative. With ``local_loss`` (the default) each rank
    scores only its own rows against all ranks' columns, with labels offset by ``rank * B``, so the
    logits are ``[B, world * B]`` and memory grows with the local batch, not the global one; without
    it each rank builds the full ``[world * B, world * B]`` matrix. Both give the gradient of the
    loss over the global batch once DDP averages gradients over ranks.

    ``forward`` returns ``contrastive_loss`` and the top-1 accuracies ``i2t_top1`` and ``t2i_top1``
    (the right text is the highest-scored of all columns; chance is ``1 / (world * B)``).
    """

    def __init__(self, local_loss: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self._labels: dict[tuple[torch.device, int, int], Tensor] = {}

    def labels(self, count: int, offset: int, device: torch.device) -> Tensor:
        """``offset + arange(count)``, cached per device, size and offset (runtime only, not state)."""
        key = (device, count, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + count, device=device)
        return self._labels[key]

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, gather: bool = True
    ) -> dict[str, Tensor]:
        """``image_features``, ``text_features``: ``[B, D]`` L2-normalised, this rank's memes.
        ``logit_scale``: ``[]`` the inverse temperature (already exponentiated and clamped).
        ``gather=False`` scores this rank's batch alone (validation, where ranks hold different counts).
        """
        image, text = image_features.float(), text_features.float()  # logits up to 100: keep float32
        spread = gather and world_size() > 1
        all_image = gather_with_grad(image) if spread else image  # [N, D], N = world * B
        all_text = gather_with_grad(text) if spread else text  # [N, D]
        if self.local_loss:
            logits_per_image = logit_scale * image @ all_text.T  # [B, N]
            logits_per_text = logit_scale * text @ all_image.T  # [B, N]
            labels = self.labels(len(image), rank() * len(image) if spread else 0, image.device)  # [B]
        else:
            logits_per_image = logit_scale * all_image @ all_text.T  # [N, N]
            logits_per_text = logits_per_image.T  # [N, N]
            labels = self.labels(len(all_image), 0, image.device)  # [N]
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        with torch.no_grad():
            i2t = (logits_per_image.argmax(dim=1) == labels).float().mean()
            t2i = (logits_per_text.argmax(dim=1) == labels).float().mean()
        return {"contrastive_loss": loss, "i2t_top1": i2t, "t2i_top1": t2i}
