"""Losses as small building blocks; each returns a scalar and documents its shapes."""

from memetrain.losses.classification import focal_loss, masked_bce

__all__ = ["focal_loss", "masked_bce"]
