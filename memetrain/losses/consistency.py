"""Agreement between two modalities' predictions: CMML's diversity and robust consistency terms
(Yang et al., "Comprehensive Semi-Supervised Multi-Modal Learning", IJCAI 2019).

Each modality predicts a probability of class 1 per target, ``[B, K]``. As a prediction vector
it is read as each target's two-class distribution ``(p, 1 - p)``, concatenated: ``[B, 2K]``.
(The paper's data sets have many labels and compare the K sigmoid outputs directly; with one
binary label that vector is a positive scalar whose cosine with another is always 1, so the
two-class form is what makes the terms defined for memes.) With ``two_class=False`` the vectors are
the K probabilities themselves, as the SemiMemes study's CMML code compares them (its ``loss.py``
241-255: cosine of the sigmoid outputs over MAMI's four task-B labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


@in_float32
def prediction_cosine(first: Tensor, second: Tensor, two_class: bool = True) -> Tensor:
    """Cosine ``[B]`` between two modalities' prediction vectors, from probabilities ``[B, K]``."""
    if not two_class:
        return F.cosine_similarity(first, second, dim=1)
    return F.cosine_similarity(_two_class(first), _two_class(second), dim=1)


@in_float32
def diversity_loss(first: Tensor, second: Tensor, rows: Tensor, two_class: bool = True) -> Tensor:
    """Mean cosine ``[]`` of the predictions over ``rows`` (bool ``[B]``: the labeled memes);
    minimising it keeps the modalities from all making the same call where labels train them."""
    return masked_mean(prediction_cosine(first, second, two_class), rows)


@in_float32
def robust_consistency_loss(
    first: Tensor, second: Tensor, rows: Tensor, delta: float, two_class: bool = True
) -> Tensor:
    """Mean Huber loss ``[]`` of the distance ``d = 2 - cos`` over ``rows`` (the unlabeled memes).

    ``d`` and the threshold ``delta`` (default 1.003) are those of the CMML code in the authors'
    group's OMML library (``torchmm/models/cmml.py``): ``d`` lies in [1, 2] for probability
    vectors, so all but near-identical predictions fall in the Huber loss's linear part, whose
    gradient is bounded. A modality that disagrees strongly (the insufficient one) pulls no
    harder than one that disagrees a little, unlike a squared consistency.
    """
    distance = 2 - prediction_cosine(first, second, two_class)
    huber = F.huber_loss(distance, torch.zeros_like(distance), reduction="none", delta=delta)
    return masked_mean(huber, rows)


def _two_class(probabilities: Tensor) -> Tensor:
    """``[B, K]`` -> ``[B, 2K]``: every target's p, then every target's 1 - p (a cosine ignores the order)."""
    return torch.cat([probabilities, 1 - probabilities], dim=1)
