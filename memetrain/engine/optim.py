"""AdamW with decay only on weight matrices: biases, norms and embeddings' 1-d parameters are
left undecayed (as in BERT, DINO and open_clip). torch's AdamW, fused into one kernel per step on
CUDA, everywhere (DDP and DeepSpeed alike); DeepSpeed's FusedAdam when the trainer asks for it."""

from __future__ import annotations

import torch
from torch import nn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups; ``no_decay`` holds every parameter with fewer than 2 dimensions."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], eps: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where the device supports it (CUDA)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type == "cuda")


def build_optimizer(groups: list[dict], trainer, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``trainer`` (``configs/trainer/*.yaml``) asks for, over ``groups``."""
    lr, betas, eps = trainer["lr"], trainer["betas"], trainer["eps"]
    if trainer["strategy"] == "deepspeed" and trainer["deepspeed"]["optimizer"] == "fused_adam":
        from memetrain.engine.zero import build_fused_adam

        return build_fused_adam(groups, lr, betas, eps)
    return build_adamw(groups, lr, betas, eps, device)
