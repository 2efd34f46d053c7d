"""A cross-modal auto-encoder: one modality's feature in, the other modality's feature out."""

from __future__ import annotations

from torch import Tensor, nn


class CrossModalAutoencoder(nn.Module):
    """``[B, in_dim]`` -> ``encode`` -> latent ``[B, latent_dim]`` -> ``decode`` -> ``[B, out_dim]``.

    Each half is Linear -> GELU -> Linear through ``hidden_dim``. Trained to predict the paired
    meme's feature in the other modality, the latent keeps what one modality tells of the other.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, latent_dim: int = 256):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )
        self.latent_dim = latent_dim

    def encode(self, features: Tensor) -> Tensor:
        return self.encoder(features)  # [B, latent_dim]

    def forward(self, features: Tensor) -> Tensor:
        return self.decoder(self.encoder(features))  # [B, out_dim]
