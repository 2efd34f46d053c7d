"""Loss math in float32 whatever autocast the caller trains under: the one home of that rule.

Autocast rewrites matmuls and einsums to bf16/fp16 even when their inputs were cast with
``.float()``: CLIP's logits at a scale of 100, DINO's softmax at temperature 0.04 and its einsum
would then carry two or three significant digits. :func:`in_float32` turns autocast off on the
device of a loss's tensors and casts its half-precision inputs to float32; gradients flow back
through the casts in the callers' dtype.

    @in_float32
    def my_loss(logits: Tensor, targets: Tensor) -> Tensor: ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

Fn = TypeVar("Fn", bound=Callable[..., Any])


def in_float32(fn: Fn) -> Fn:
    """Decorator: ``fn`` runs with autocast disabled on its tensors' device type (the first tensor
    argument's; ``cpu`` without one), its half-precision tensor arguments (bf16, fp16, fp8) cast
    to float32, also inside lists, tuples and dicts. float32 and float64 tensors, integer and bool
    tensors (labels, masks) pass unchanged, and so does anything else (``self`` of a decorated
    ``forward``). Buffers the function reads itself
    (a center, a queue) are its own to keep in float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _float32(args), _float32(kwargs)
        with torch.autocast(_device_type((args, kwargs)), enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _float32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() and value.element_size() < 4 else value
    if isinstance(value, list):
        return [_float32(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: _float32(item) for key, item in value.items()}
    return value


def _device_type(value: Any) -> str:
    """The device type of the first tensor in ``value`` (nested as in :func:`_float32`), else ``cpu``."""
    return next((tensor.device.type for tensor in _tensors(value)), "cpu")


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors(item)
