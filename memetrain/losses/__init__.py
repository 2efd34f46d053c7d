"""Losses as small building blocks; each returns a scalar and documents its shapes, and computes in
float32 with autocast off (:func:`memetrain.losses.precision.in_float32`)."""

from memetrain.losses.classification import focal_loss, masked_bce
from memetrain.losses.reconstruction import cross_reconstruction_loss

__all__ = ["cross_reconstruction_loss", "focal_loss", "masked_bce"]
