"""Classification heads on one feature vector, and the MLP block the fusion heads share.

Every head has ``embed(...) -> [B, embed_dim]`` (the representation its output layer reads,
used for t-SNE, kNN and linear probes) and ``forward(...) -> logits [B, num_outputs]``.
"""

from __future__ import annotations

from torch import Tensor, nn


def mlp(in_dim: int, hidden_dim: int, depth: int, dropout: float) -> tuple[nn.Sequential, int]:
    """``depth`` blocks of Linear -> ReLU -> Dropout, and the width of what comes out."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = hidden_dim
    return nn.Sequential(*layers), in_dim


class MLPHead(nn.Module):
    """``[B, in_dim]`` through ``depth`` hidden layers to logits ``[B, num_outputs]``."""

    def __init__(
        self, in_dim: int, num_outputs: int, hidden_dim: int = 512, depth: int = 1, dropout: float = 0.1
    ):
        super().__init__()
        self.hidden, self.embed_dim = mlp(in_dim, hidden_dim, depth, dropout)
        self.output = nn.Linear(self.embed_dim, num_outputs)

    def embed(self, features: Tensor) -> Tensor:
        return self.hidden(features)  # [B, embed_dim]

    def forward(self, features: Tensor) -> Tensor:
        return self.output(self.embed(features))  # [B, num_outputs]


class LinearHead(MLPHead):
    """One linear layer on ``[B, in_dim]``: the linear probe, and the unimodal baselines' classifier."""

    def __init__(self, in_dim: int, num_outputs: int):
        super().__init__(in_dim, num_outputs, depth=0)
