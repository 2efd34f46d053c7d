"""Schedules as pure functions of the global step: the step is the only schedule state.

Learning rate, weight decay, EMA momentum and temperatures all use these, so a resumed run gets
the same values from the restored step with nothing else to checkpoint.
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (held there after)."""
    if total_steps <= 0:
        return end
    progress = min(step, total_steps) / total_steps
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float, initial: float = 0.0
) -> float:
    """Linear warmup from ``initial`` to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return initial + (peak - initial) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` to ``end`` linearly over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
