"""The one interface between an objective and the engine and evaluation.

A method is an ``nn.Module`` that owns its model(s) and its loss. The engine calls
``training_step`` each micro-batch, sums the returned terms whose names end in ``_loss``, logs the
rest, and calls the hooks around each optimizer step. Evaluation calls ``embed`` (features for a
linear probe, kNN or t-SNE) and, for methods that classify, ``predict``, or both in one
``embed_and_predict``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from memetrain.engine.optim import OPTIMIZERS, clip_global_norm, decay_groups
from memetrain.errors import ConfigError

RECIPE_KEYS = {
    "optimizer", "lr", "min_lr", "warmup_steps", "weight_decay", "weight_decay_end", "betas", "eps",
    "momentum", "grad_clip", "lr_schedule",
}  # fmt: skip
"""The trainer options a stage's recipe (``Stage.trainer``, a method's ``recipe`` option) may set."""

Batch = dict[str, Any]


def valid_rows(batch: Batch) -> Tensor | None:
    """``batch["valid"]``, bool ``[B]``: False on a row that only keeps the batch at its size (a copy
    of another sample standing in for a bad one, or padding at the end of an exact epoch). Such a
    row counts in no loss and no running statistic. ``None`` for a batch without it: every row counts.

    CLIP's loss spans ranks and is the mean over the global batch's valid rows; the other losses
    average over each rank's valid rows and DDP averages the ranks, as with missing labels. Batch
    norm in train mode still sees every row (the models do not take the mask)."""
    return batch.get("valid")


@dataclass(frozen=True)
class Stage:
    """One phase of a run with its own optimizer, schedule and checkpoints: ``steps`` optimizer
    steps on the labeled fraction of the training split (``needs_labels``), or else on every
    training meme, the data's unlabeled splits included.

    ``unlabeled_ratio`` μ > 0 (with ``needs_labels``) makes it semi-supervised: each batch is
    ``data.batch_size`` memes of the labeled fraction followed by μ × ``data.batch_size`` memes
    from every training meme and the unlabeled splits, whose labels read -1
    (:class:`memetrain.data.semi_supervised.SemiSupervisedStream`).

    ``trainer``: the stage's own optimiser and schedule, as its paper's code trains it (trainer
    options of :data:`RECIPE_KEYS`, e.g. ``{"optimizer": "adam", "lr": 2e-4, "lr_schedule": {"kind":
    "step", ...}}``), which replace the run's ``trainer.*`` for this stage; empty: the run's trainer."""

    name: str
    steps: int
    needs_labels: bool
    unlabeled_ratio: float = 0.0
    trainer: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unlabeled_ratio < 0 or (self.unlabeled_ratio > 0 and not self.needs_labels):
            raise ConfigError(
                f"stage {self.name}: unlabeled_ratio={self.unlabeled_ratio} must be >= 0, and > 0 only "
                "for a stage that needs labels (a label-free stage reads every meme already)"
            )
        check_recipe(self.trainer, f"stage {self.name}")

    def trainer_options(self, trainer: Mapping[str, Any]) -> dict[str, Any]:
        """The run's trainer options with this stage's recipe over them."""
        return {**trainer, **self.trainer}

    @property
    def reads_unlabeled(self) -> bool:
        """Whether the stage streams the data's unlabeled splits."""
        return not self.needs_labels or self.unlabeled_ratio > 0


def check_recipe(recipe: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``recipe`` (null: none) as a dict, refusing keys a recipe cannot set and unknown optimizers."""
    recipe = dict(recipe or {})
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: recipe keys {unknown} are not trainer options a recipe sets; use {sorted(RECIPE_KEYS)}"
        )
    if recipe.get("optimizer", "adamw") not in OPTIMIZERS:
        raise ConfigError(
            f"{where}: optimizer={recipe['optimizer']!r}: choose one of {', '.join(OPTIMIZERS)}"
        )
    return recipe


class Method(nn.Module, metaclass=ABCMeta):
    """Subclasses set ``name`` (and ``needs_labels``) and implement ``training_step`` and ``embed``."""

    name: str = ""
    needs_labels: bool = False
    """True if training uses labels (the train stream is then cut to the labeled fraction)."""
    sync_batchnorm: bool = False
    """True if the objective needs batch-norm statistics of the whole global batch (DINO's and
    BYOL-style projection heads): ``trainer.sync_batchnorm=auto`` then synchronises them over the
    processes (on GPUs)."""
    targets: list[str]
    """Methods that classify: the label columns ``predict`` scores, in order (set in ``__init__``)."""

    @abstractmethod
    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(losses, report): scalar tensors; losses' names end in ``_loss`` and are summed. Rows
        that are not :func:`valid_rows` count in no loss and update no running statistic."""

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

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """``(embed(batch), predict(batch))``, what evaluation wants of every batch. By default the
        two calls; a method whose logits are computed from its embedding overrides it to run the
        encoders once."""
        return self.embed(batch), self.predict(batch)

    @property
    def classifies(self) -> bool:
        """Whether this method overrides ``predict`` (the ``classifier`` eval protocol needs it)."""
        return type(self).predict is not Method.predict

    recipe: dict[str, Any] = {}
    """The paper's optimiser and schedule for this method's training (the method config's
    ``recipe`` option, set by :func:`memetrain.methods.registry.build_method`): trainer options that
    replace the run's ``trainer.*``; empty: the run's trainer."""

    def stages(self, max_steps: int) -> list[Stage]:
        """The phases of training, run in order in one job; by default one of ``max_steps`` steps
        with the method's ``recipe``."""
        return [Stage("train", max_steps, self.needs_labels, trainer=self.recipe)]

    def observe_labels(self, labels: Any, label_names: list[str]) -> None:
        """Called once before training, with the label columns ``[N, L]`` (-1 missing) of the memes
        the labeled stages train on (the run's labeled fraction of the train split) and their names;
        a loss that weighs labels by their frequency (``loss: resample``) takes its counts here. By
        default the method's ``objective`` (:class:`memetrain.methods.objective.ClassificationObjective`)
        sees them, if it has one."""
        observe = getattr(getattr(self, "objective", None), "observe_labels", None)
        if observe is not None:
            observe(labels, label_names)

    def start_stage(self, stage: Stage) -> None:
        """Called before each stage is built: freeze or unfreeze parts here."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; by default no decay on biases and norms."""
        return decay_groups(self, weight_decay)

    def before_step(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step's micro-batches (schedules of temperatures ...)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step that was applied (EMA teachers ...)."""

    def clip_gradients(self, max_norm: float | None) -> Tensor:
        """Clip the gradients of the optimizer step about to be taken (already averaged over the
        processes and, under fp16, unscaled) to ``max_norm`` (``trainer.grad_clip``; None: no
        clipping), and return their joint norm before clipping. By default the joint norm of all
        gradients is clipped (torch's ``clip_grad_norm_``); DINO clips each parameter's on its own
        and drops the gradients of its frozen last layer (:meth:`memetrain.methods.dino.Dino.clip_gradients`)."""
        return clip_global_norm(self.parameters(), max_norm)

    def edited_after_step(self) -> list[nn.Parameter]:
        """The trained parameters (the optimizer's) that :meth:`after_step` changes in place, such as a
        clamp. An optimizer that steps from master copies of its own (DeepSpeed's ZeRO-1/2 keep float32
        ones) would undo such a change at its next step: the engine hands these parameters' edits on to
        those copies. Parameters it does not train (an EMA teacher) need not be listed."""
        return []
