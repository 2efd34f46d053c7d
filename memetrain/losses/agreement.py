"""Agreement losses: CASS's cross-architecture objective and its multimodal variant CASS-MM.

CASS (Singh, Gorantla et al., "CASS: Cross Architectural Self-Supervision for Medical Image
Analysis", 2022, arXiv:2206.04170) feeds the same augmented image to a CNN and a ViT and pulls their
outputs together with BYOL's normalised regression loss (Grill et al., "Bootstrap Your Own Latent",
2020, eq. 2):

    l(a, b) = || a / |a| - b / |b| ||^2 = 2 - 2 cos(a, b)

No stop-gradient and no EMA: both networks receive the gradient. BYOL symmetrises by swapping two
views between its networks; with one shared view and nothing detached, l(a, b) = l(b, a) and the
symmetrised loss (l(a, b) + l(b, a)) / 2 is l(a, b) itself, so it is computed once.

Nothing in that loss keeps the embeddings apart: networks trained from scratch can agree on one
constant output. CASS starts from ImageNet weights; on SynthMemes from scratch, CASS-MM collapsed
within 30 steps and CASS within 300 (embedding_std 0.01 and 0.12, loss 0). :func:`variance_hinge`
is our optional guard against that (``method.variance_weight``; 0 is the paper's loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


@in_float32
def cosine_agreement_loss(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over the batch of ``2 - 2 cos(a_i, b_i)``: 0 when every pair is parallel, 4 when opposite.

    a, b: [B, D] (any scale; each row is L2-normalised). Symmetric in ``a`` and ``b``; nothing is
    detached. Computed in float32: under bf16 the cosine of near-parallel vectors loses its digits.
    ``valid`` (bool ``[B]``, default all) selects the rows averaged over.
    """
    a = F.normalize(a, dim=1)  # [B, D], unit rows
    b = F.normalize(b, dim=1)  # [B, D], unit rows
    return masked_mean(2 - 2 * (a * b).sum(dim=1), valid)  # [B] -> []


@in_float32
def variance_hinge(z: Tensor, target: float = 0.5, valid: Tensor | None = None) -> Tensor:
    """VICReg's variance term (Bardes, Ponce, LeCun 2022, eq. 1) on L2-normalised rows: the mean over
    dimensions of ``relu(target - sqrt(D) * std_d)``, the std taken over the batch (with VICReg's
    1e-4 inside the root). 0 while the embeddings spread, ``target`` when they are one point.

    On unit rows (scaled by sqrt(D), as :func:`memetrain.losses.monitor.embedding_std`) a network
    cannot meet it by growing its outputs, which a cosine agreement ignores. z: [B, D], B >= 2.
    The statistics are those of the rows ``valid`` selects (bool ``[B]``, default all; at least 2).
    """
    z = F.normalize(z, dim=1)  # [B, D]
    rows = (torch.ones(len(z), dtype=torch.bool, device=z.device) if valid is None else valid)[:, None]
    count = rows.sum()  # n, the rows counted
    centred = z - masked_mean(z, rows, dim=0)  # [B, D]
    var = masked_mean(centred**2, rows, dim=0) * count / (count - 1).clamp(min=1)  # [D], unbiased
    std = torch.sqrt(var + 1e-4) * math.sqrt(z.shape[1])  # [D]
    return F.relu(target - std).mean()


def mean_variance_hinge(branches: Sequence[Tensor], valid: Tensor | None = None) -> Tensor:
    """:func:`variance_hinge` averaged over branches (each ``[B, D]``, statistics over the rows
    ``valid`` selects): the ``variance_loss`` of CASS and CASS-MM before its weight."""
    return sum(variance_hinge(z, valid=valid) for z in branches) / len(branches)


class CassMMLoss(nn.Module):
    """CASS-MM: CASS between the image and the text of a meme, plus optionally CASS between two image nets.

    With projected embeddings ``z_t`` (text) and ``z_b`` for each image branch ``b`` (one or two of
    CNN, ViT), all ``[B, D]`` in one projection space, and ``l`` as :func:`cosine_agreement_loss`:

        cross_modal_loss = mean over image branches b of l(z_b, z_t)
        unimodal_loss    = lambda * l(z_cnn, z_vit)          (only with two image branches)
        variance_loss    = mu * mean over all branches of variance_hinge(z)   (only with mu > 0)
        total            = cross_modal_loss + unimodal_loss + variance_loss

    ``forward`` returns the named terms; with ``unimodal_weight`` (lambda) and ``variance_weight``
    (mu) 0 the total is the cross-modal term alone. Gradients reach every embedding: nothing is detached.
    Every term counts only the rows ``valid`` selects.
    """

    def __init__(self, unimodal_weight: float = 0.0, variance_weight: float = 0.0):
        super().__init__()
        self.unimodal_weight, self.variance_weight = unimodal_weight, variance_weight

    def forward(self, images: list[Tensor], text: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        """images: one or two ``[B, D]`` (CNN first); text: ``[B, D]``; valid: bool ``[B]`` or None (all)."""
        cross = sum(cosine_agreement_loss(z, text, valid) for z in images) / len(images)  # []
        losses = {"cross_modal_loss": cross}
        if len(images) == 2:
            losses["unimodal_loss"] = self.unimodal_weight * cosine_agreement_loss(*images, valid)  # []
        if self.variance_weight > 0:
            losses["variance_loss"] = self.variance_weight * mean_variance_hinge([*images, text], valid)
        return losses
