"""Multimodal heads: image features ``[B, Di]`` and text features ``[B, Dt]`` to logits ``[B, num_outputs]``.

Each has ``embed(image, text) -> [B, embed_dim]``, the fused representation its output layer reads,
and ``forward(image, text)``. Late and concatenation fusion are the classic baselines (Kiela et al.
2020, "The Hateful Memes Challenge"); align and cross fusion are Hate-CLIPper's (Kumar and
Nandakumar 2022, "Hate-CLIPper: Multimodal Hateful Meme Classification based on Cross-modal
Interaction of CLIP Features").
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.models.heads import mlp


class LateFusion(nn.Module):
    """Late fusion: one linear classifier per modality, logits averaged.

    ``embed`` is the two features concatenated, ``[B, Di + Dt]``: nothing is fused before the output.
    """

    def __init__(self, image_dim: int, text_dim: int, num_outputs: int):
        super().__init__()
        self.image_head = nn.Linear(image_dim, num_outputs)
        self.text_head = nn.Linear(text_dim, num_outputs)
        self.embed_dim = image_dim + text_dim

    def embed(self, image: Tensor, text: Tensor) -> Tensor:
        return torch.cat([image, text], dim=1)  # [B, Di + Dt]

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return (self.image_head(image) + self.text_head(text)) / 2  # [B, num_outputs]


class ConcatFusion(nn.Module):
    """Concatenation fusion: an MLP over ``[image, text]`` ``[B, Di + Dt]``."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_outputs: int,
        hidden_dim: int = 512,
        depth: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.hidden, self.embed_dim = mlp(image_dim + text_dim, hidden_dim, depth, dropout)
        self.output = nn.Linear(self.embed_dim, num_outputs)

    def embed(self, image: Tensor, text: Tensor) -> Tensor:
        return self.hidden(torch.cat([image, text], dim=1))  # [B, embed_dim]

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return self.output(self.embed(image, text))  # [B, num_outputs]


class _InteractionFusion(nn.Module, metaclass=ABCMeta):
    """Hate-CLIPper's layout: project each modality to ``dim`` (Linear, Dropout) and L2-normalise,
    combine the two projections (the subclass's :meth:`interact`), then dropout, ``depth`` pre-output
    layers of width ``dim`` (Linear, ReLU, Dropout) and the output layer. The dropout defaults are
    the paper's (0.1 on projections, 0.4 on the fused vector, 0.2 in the pre-output layers).
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_outputs: int,
        dim: int = 64,
        depth: int = 1,
        projection_dropout: float = 0.1,
        fusion_dropout: float = 0.4,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.image_proj = nn.Sequential(nn.Linear(image_dim, dim), nn.Dropout(projection_dropout))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, dim), nn.Dropout(projection_dropout))
        self.fusion_dropout = nn.Dropout(fusion_dropout)
        self.hidden, self.embed_dim = mlp(self.fused_dim(dim), dim, depth, dropout)
        self.output = nn.Linear(self.embed_dim, num_outputs)

    @abstractmethod
    def fused_dim(self, dim: int) -> int:
        """Width of :meth:`interact`'s output for projections of width ``dim``."""

    @abstractmethod
    def interact(self, image: Tensor, text: Tensor) -> Tensor:
        """Combine the unit projections ``[B, dim]`` into ``[B, fused_dim(dim)]``."""

    def project(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-length projections ``p_i``, ``p_t``: ``[B, dim]`` each."""
        return F.normalize(self.image_proj(image), dim=1), F.normalize(self.text_proj(text), dim=1)

    def embed(self, image: Tensor, text: Tensor) -> Tensor:
        fused = self.interact(*self.project(image, text))
        return self.hidden(self.fusion_dropout(fused))  # [B, embed_dim]

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return self.output(self.embed(image, text))  # [B, num_outputs]


class AlignFusion(_InteractionFusion):
    """Hate-CLIPper align fusion: the element-wise product ``p_i * p_t`` ``[B, dim]``, the diagonal
    of the feature interaction matrix (Kumar and Nandakumar 2022)."""

    def fused_dim(self, dim: int) -> int:
        return dim

    def interact(self, image: Tensor, text: Tensor) -> Tensor:
        return image * text  # [B, dim]


class CrossFusion(_InteractionFusion):
    """Hate-CLIPper cross fusion: the feature interaction matrix ``p_i p_t^T`` ``[B, dim, dim]``,
    flattened to ``[B, dim * dim]`` (Kumar and Nandakumar 2022). The paper uses ``dim`` up to 1024
    with ``depth=0``; a pre-output layer has ``dim ** 3`` weights, so keep ``dim`` small with it.
    """

    def fused_dim(self, dim: int) -> int:
        return dim * dim

    def interact(self, image: Tensor, text: Tensor) -> Tensor:
        # b: batch, i: image projection, t: text projection
        return torch.einsum("bi,bt->bit", image, text).flatten(1)  # [B, dim * dim]
