"""Switches over a built model that trade compute for memory or change its memory layout:
gradient checkpointing of every backbone, channels-last images and convolutions.

Gradient checkpointing recomputes a backbone's blocks in the backward pass instead of keeping
their activations, always non-reentrant (timm's default, and what we ask of transformers and get
from open_clip): parameters get their gradients in the normal autograd pass, so DDP's hooks fire
once per parameter and DeepSpeed's ZeRO hooks see ordinary backward calls.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from memetrain.errors import ConfigError
from memetrain.models.image import ImageNormalizer


def enable_gradient_checkpointing(model: nn.Module) -> tuple[list[str], list[str]]:
    """Checkpoint every backbone in ``model`` that supports it; returns (enabled, unsupported):
    the module names of timm and open_clip models and transformers, and of those that cannot
    (an LSTM: its cuDNN kernel runs the whole sequence as one op, so there is nothing to cut;
    a timm model without the feature, such as VGG)."""
    enabled, unsupported = [], []
    handled: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in handled):
            continue  # inside a backbone switched as a whole
        label = name or type(model).__name__
        if isinstance(module, PreTrainedModel):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif isinstance(module, nn.LSTM):
            unsupported.append(label)
            continue
        elif callable(getattr(module, "set_grad_checkpointing", None)):
            try:
                module.set_grad_checkpointing(True)
            except AssertionError:  # timm's way of saying "not supported" (VGG)
                unsupported.append(label)
                continue
        else:
            continue
        enabled.append(label)
        handled.append(name)
    return enabled, unsupported


def use_channels_last(model: nn.Module) -> None:
    """4-d weights (convolutions) and the normalised input images in channels-last layout: what
    tensor cores want for convolutions under bf16/fp16 on GPU (on CPU our runs were slower)."""
    normalizers = [module for module in model.modules() if isinstance(module, ImageNormalizer)]
    if not normalizers:
        raise ConfigError("trainer.channels_last=true but the model has no image encoder; set it to false")
    for normalizer in normalizers:
        normalizer.memory_format = torch.channels_last
    model.to(memory_format=torch.channels_last)
