"""Collapse monitor for self-supervised objectives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

COLLAPSE_WARNING = 0.1
"""``embedding_std`` below this means the embeddings are collapsing towards one point."""


@torch.no_grad()
def embedding_std(z: Tensor) -> Tensor:
    """Mean per-dimension standard deviation of L2-normalised embeddings, times sqrt(D).

    z: [B, D]. About 1 when embeddings spread over the sphere, 0 when they collapse to one point
    (the monitor of SimSiam, Chen & He 2021, sec. 4.1, scaled so the healthy value does not depend on D).
    """
    z = F.normalize(z.float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])
