"""The one interface between an objective and the engine and evaluation.

A method is an ``nn.Module`` that owns its model(s) and its loss. The engine calls
``training_step`` each micro-batch, sums the returned terms whose names end in ``_loss``, logs the
rest, and calls the hooks around each optimizer step. Evaluation calls ``embed`` (features for a
linear probe, kNN or t-SNE) and, for methods that classify, ``predict``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from memetrain.engine.optim import decay_groups
from memetrain.errors import ConfigError

Batch = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """One phase of a run with its own optimizer, schedule and checkpoints: ``steps`` optimizer
    steps on the labeled fraction of the training split (``needs_labels``), or else on every
    training meme, the data's unlabeled splits included.

    ``unlabeled_ratio`` μ > 0 (with ``needs_labels``) makes it semi-supervised: each batch is
    ``data.batch_size`` memes of the labeled fraction followed by μ × ``data.batch_size`` memes
    from every training meme and the unlabeled splits, whose labels read -1
    (:class:`memetrain.data.semi_supervised.SemiSupervisedStream`)."""

    name: str
    steps: int
    needs_labels: bool
    unlabeled_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.unlabeled_ratio < 0 or (self.unlabeled_ratio > 0 and not self.needs_labels):
            raise ConfigError(
                f"stage {self.name}: unlabeled_ratio={self.unlabeled_ratio} must be >= 0, and > 0 only "
                "for a stage that needs labels (a label-free stage reads every meme already)"
            )

    @property
    def reads_unlabeled(self) -> bool:
        """Whether the stage streams the data's unlabeled splits."""
        return not self.needs_labels or self.unlabeled_ratio > 0


class Method(nn.Module, metaclass=ABCMeta):
    """Subclasses set ``name`` (and ``needs_labels``) and implement ``training_step`` and ``embed``."""

    name: str = ""
    needs_labels: bool = False
    """True if training uses labels (the train stream is then cut to the labeled fraction)."""
    targets: list[str]
    """Methods that classify: the label columns ``predict`` scores, in order (set in ``__init__``)."""

    @abstractmethod
    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(losses, report): scalar tensors; losses' names end in ``_loss`` and are summed."""

    def forward(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The training step, as ``forward`` so that DDP and DeepSpeed wrappers see it."""
        return self.training_step(batch)

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, Tensor]:
        """Scalar metrics averaged over the validation split (by default the training losses)."""
        losses, report = self.training_step(batch)
        return {**losses, **report}

    @abstractmethod
    def embed(self, batch: Batch) -> Tensor:
        """Features ``[B, D]`` of the memes in ``batch`` for probes, kNN and t-SNE."""

    def predict(self, batch: Batch) -> Tensor | None:
        """Logits ``[B, outputs]`` for methods that classify; ``None`` for pure pretraining."""
        return None

    @property
    def classifies(self) -> bool:
        """Whether this method overrides ``predict`` (the ``classifier`` eval protocol needs it)."""
        return type(self).predict is not Method.predict

    def stages(self, max_steps: int) -> list[Stage]:
        """The phases of training, run in order in one job; by default one of ``max_steps`` steps."""
        return [Stage("train", max_steps, self.needs_labels)]

    def start_stage(self, stage: Stage) -> None:
        """Called before each stage is built: freeze or unfreeze parts here."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; by default no decay on biases and norms."""
        return decay_groups(self, weight_decay)

    def before_step(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step's micro-batches (schedules of temperatures ...)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step that was applied (EMA teachers ...)."""
