"""Means over the rows a loss counts: the one home of masked averaging.

A batch keeps ``batch_size`` rows on every rank. A row whose ``batch["valid"]`` is False holds a
copy of another sample (standing in for a bad one, or padding the end of an epoch) and counts in
no loss; a missing label (-1) likewise drops an entry from a classification loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor | None, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the entries where ``mask`` is True (over dimension ``dim``, or all).

    ``mask`` is bool and broadcasts to ``values`` (``[B]`` against ``[..., B]``; ``[B, 1]`` against
    ``[B, K]``); ``None`` counts every entry. With nothing selected the mean is 0, with a gradient
    path. The value of an unselected entry never reaches the result, even a NaN or an inf.
    """
    if mask is None:
        return values.mean() if dim is None else values.mean(dim)
    mask = mask.expand_as(values)
    selected = torch.where(mask, values, 0)
    if dim is None:
        return selected.sum() / mask.sum().clamp(min=1)
    return selected.sum(dim) / mask.sum(dim).clamp(min=1)
