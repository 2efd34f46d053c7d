"""Test-only methods that inject numerical faults into a real run at chosen optimizer steps.

They are registered only by ``train_with_faulty_methods.py`` (the real ``launcher/train.py`` entry
point with this module imported first), so production code carries no fault-injection hook:

    python tests/faults/train_with_faulty_methods.py method.name=faulty_supervised \
        '+method.nan_loss_steps=[3]' '+method.inf_grad_steps=[5]' ...

Steps are 0-based optimizer steps, as the trainer passes them to ``Method.before_step``.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

import torch

from memetrain.methods.registry import DataInfo, register
from memetrain.methods.supervised import Supervised


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back is infinite (a finite loss, an overflowing backward)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


@register
class FaultySupervised(Supervised):
    """Supervised, whose loss is NaN at ``nan_loss_steps``, whose gradient is infinite (the loss
    itself finite) at ``inf_grad_steps``, and which sends its own process SIGTERM as each of
    ``sigterm_steps`` begins."""

    name = "faulty_supervised"

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        init: dict[str, dict[str, str] | None] | None = None,
        nan_loss_steps: list[int] = (),
        inf_grad_steps: list[int] = (),
        sigterm_steps: list[int] = (),
    ):
        super().__init__(model, data, targets, loss, focal_gamma, init)
        self.nan_loss_steps, self.inf_grad_steps = set(nan_loss_steps), set(inf_grad_steps)
        self.sigterm_steps = set(sigterm_steps)
        self.step = 0

    def before_step(self, step: int, total_steps: int) -> None:
        super().before_step(step, total_steps)
        self.step = step
        if step in self.sigterm_steps:  # as Slurm's preemption or kill would, mid-step: no race to lose
            os.kill(os.getpid(), signal.SIGTERM)

    def training_step(self, batch):
        losses, report = super().training_step(batch)
        if self.training and self.step in self.nan_loss_steps:
            losses = {name: value * math.nan for name, value in losses.items()}
        if self.training and self.step in self.inf_grad_steps:
            losses = {name: _InfiniteGradient.apply(value) for name, value in losses.items()}
        return losses, report


@register
class IdRecordingSupervised(Supervised):
    """Supervised that appends the id of every meme it trains on (not validates) to ``ids_file``."""

    name = "id_recording_supervised"

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        ids_file: str,
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        init: dict[str, dict[str, str] | None] | None = None,
    ):
        super().__init__(model, data, targets, loss, focal_gamma, init)
        self.ids_file = ids_file

    def training_step(self, batch):
        if not self.training:  # validation's losses
            return super().training_step(batch)
        with open(self.ids_file, "a") as handle:
            handle.writelines(
                f"{meme}\n" for meme, valid in zip(batch["id"], batch["valid"].tolist()) if valid
            )
        return super().training_step(batch)
