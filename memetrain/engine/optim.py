"""Optimizers, learning-rate schedules and gradient clipping, as the studies' recipes need them.

- :func:`decay_groups`: decay only on weight matrices; biases, norms and other 1-d parameters are
  left undecayed (as in BERT, DINO's ``utils.get_params_groups`` and open_clip).
- :func:`build_optimizer`: ``trainer.optimizer`` ``adamw`` (torch's AdamW, fused into one kernel per
  step on CUDA; the default), ``adam`` (torch's Adam: weight decay is an L2 term added to the
  gradient, as the SemiMemes, CMML and TIB-VA code use it), ``sgd`` (momentum ``trainer.momentum``,
  default 0.9: DINO's ResNet-50 recipe); DeepSpeed's FusedAdam when the trainer asks for it. A
  trainer config without ``optimizer`` trains with AdamW (configs/trainer/*.yaml do not name it yet).
- :func:`lr_at`: the learning rate at a step, a pure function of the step (``trainer.lr_schedule``)
  and, for ``plateau`` (:class:`Plateau`), of how often the dev metric has stopped improving.
- :func:`clip_global_norm` and :func:`clip_per_parameter`: the engine's clipping, and DINO's
  (``utils.clip_gradients``: every parameter's gradient clipped to the norm on its own).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from memetrain.engine.schedules import warmup_cosine
from memetrain.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
LOWER_IS_BETTER_SUFFIX = "loss"  # a dev metric named *loss improves downwards, every other upwards
SCHEDULES = ("warmup_cosine", "warmup_linear", "step", "multistep", "cosine_annealing", "constant", "plateau")


# A parameter group with this key set decays by the trainer's schedule (trainer.weight_decay ->
# weight_decay_end) at every step; a group without it keeps the decay it was built with.
SCHEDULED_DECAY = "scheduled_decay"


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups; ``no_decay`` holds every parameter with fewer than 2 dimensions."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay", SCHEDULED_DECAY: True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], eps: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where the device supports it (CUDA)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type == "cuda")


def optimizer_kind(trainer: Mapping[str, Any]) -> str:
    """``trainer.optimizer``; a trainer config without the key (configs/trainer/*.yaml before it
    gained one) trains with AdamW, as every run did before."""
    kind = trainer.get("optimizer", "adamw")
    if kind not in OPTIMIZERS:
        raise ConfigError(f"trainer.optimizer={kind!r}: choose one of {', '.join(OPTIMIZERS)}")
    return kind


def build_optimizer(groups: list[dict], trainer, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``trainer`` (``configs/trainer/*.yaml``, and a method stage's recipe) asks for."""
    lr, betas, eps = trainer["lr"], trainer["betas"], trainer["eps"]
    kind = optimizer_kind(trainer)
    if trainer["strategy"] == "deepspeed" and trainer["deepspeed"]["optimizer"] == "fused_adam":
        if kind != "adamw":
            raise ConfigError(
                f"trainer.deepspeed.optimizer=fused_adam is AdamW, but trainer.optimizer={kind}; "
                "use trainer.deepspeed.optimizer=torch"
            )
        from memetrain.engine.zero import build_fused_adam

        return build_fused_adam(groups, lr, betas, eps)
    # Adam and SGD take torch's default implementation (foreach on CUDA): the fused kernels are
    # AdamW's alone here, whose skipped fp16 steps the trainer reads from the loss scale
    if kind == "adam":  # L2: weight_decay x parameter is added to the gradient before the moments
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=trainer.get("momentum", 0.9))
    return build_adamw(groups, lr, betas, eps, device)


# -- learning-rate schedules: pure functions of the step ----------------------------------------


def lr_at(step: int, total_steps: int, trainer: Mapping[str, Any], reductions: int = 0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``, as
    ``trainer.lr_schedule`` says (a trainer config without the key: ``warmup_cosine``):

    - ``warmup_cosine``: linear warmup from 0 over ``warmup_steps``, then a half cosine from ``lr``
      to ``min_lr`` at ``total_steps`` (DINO's ``utils.cosine_scheduler``; the engine's default);
    - ``step``: ``lr x gamma ** (step // step_every)`` (torch's StepLR stepped every ``step_every``
      optimizer steps: once an epoch in SemiMemes' ``train_2_stages.py``, every 200 steps in its
      ``CmmlTrain.py``);
    - ``multistep``: ``lr x gamma ** (milestones passed)`` (TIB-VA's MultiStepLR at epochs 5, 10, 15);
    - ``cosine_annealing``: torch's CosineAnnealingLR stepped every optimizer step and never reset,
      ``min_lr + (lr - min_lr)(1 + cos(pi step / t_max)) / 2``: periodic, back to ``lr`` every
      ``2 t_max`` steps (the CASS code's T_max=16 stepped per batch);
    - ``warmup_linear``: linear warmup from 0 over ``warmup_steps``, then linearly down to 0 at
      ``total_steps`` (MMF's ``warmup_linear``, transformers' ``get_linear_schedule_with_warmup``);
    - ``constant``: ``lr``;
    - ``plateau``: ``max(lr x factor ** reductions, min_lr)``, where ``reductions`` counts the times
      the dev ``metric`` stopped improving (:meth:`Plateau.update`; torch's ReduceLROnPlateau, which
      the simple CLIP of the CASS study steps once an epoch on its validation loss).
    """
    schedule = trainer.get("lr_schedule") or {"kind": "warmup_cosine"}
    kind, lr = schedule.get("kind", "warmup_cosine"), trainer["lr"]
    if kind == "warmup_cosine":
        return warmup_cosine(step, total_steps, trainer["warmup_steps"], lr, trainer["min_lr"])
    if kind == "warmup_linear":
        warmup = trainer["warmup_steps"]
        if step < warmup:
            return lr * step / warmup
        return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if kind == "step":
        return lr * schedule["gamma"] ** (step // _positive(schedule, "step_every"))
    if kind == "multistep":
        passed = sum(step >= milestone for milestone in schedule["milestones"])
        return lr * schedule["gamma"] ** passed
    if kind == "cosine_annealing":
        t_max, floor = _positive(schedule, "t_max"), trainer["min_lr"]
        return floor + (lr - floor) * (1 + math.cos(math.pi * step / t_max)) / 2
    if kind == "constant":
        return lr
    if kind == "plateau":
        return max(lr * Plateau.of(schedule).factor ** reductions, trainer["min_lr"])
    raise ConfigError(f"trainer.lr_schedule.kind={kind!r}: choose one of {', '.join(SCHEDULES)}")


@dataclasses.dataclass(frozen=True)
class Plateau:
    """``trainer.lr_schedule={kind: plateau, ...}``: torch's ReduceLROnPlateau over validations
    (``trainer.val_every``) instead of epochs, with its defaults: the rate is multiplied by
    ``factor`` once ``metric`` has not improved (by more than ``threshold``, relative) for more than
    ``patience`` validations in a row; the count then starts again. A metric improves as
    ``trainer.keep_best`` reads it: downwards if named ``*loss``, upwards otherwise."""

    metric: str = "loss"
    patience: int = 10
    factor: float = 0.1
    threshold: float = 1e-4

    @classmethod
    def of(cls, schedule: Mapping[str, Any]) -> Plateau:
        unknown = sorted(set(schedule) - {"kind", *(f.name for f in dataclasses.fields(cls))})
        if unknown:
            raise ConfigError(
                f"trainer.lr_schedule has {', '.join(unknown)}, which plateau does not take "
                "(metric, patience, factor, threshold)"
            )
        plateau = cls(**{k: v for k, v in schedule.items() if k != "kind"})
        if (
            isinstance(plateau.patience, bool)
            or not isinstance(plateau.patience, int)
            or plateau.patience < 0
        ):
            raise ConfigError(f"trainer.lr_schedule.patience={plateau.patience!r}: give a whole number >= 0")
        if not 0 < plateau.factor < 1:
            raise ConfigError(f"trainer.lr_schedule.factor={plateau.factor!r}: give a number between 0 and 1")
        return plateau

    def update(self, value: float, best: float | None, bad: int) -> tuple[float | None, int, bool]:
        """After a validation with ``value`` of the metric: the new ``(best, bad validations, reduce)``."""
        lower = self.metric.endswith(LOWER_IS_BETTER_SUFFIX)
        if best is None or (
            value < best * (1 - self.threshold) if lower else value > best * (1 + self.threshold)
        ):
            return value, 0, False
        if bad + 1 > self.patience:
            return best, 0, True
        return best, bad + 1, False


def _positive(schedule: Mapping[str, Any], key: str) -> int:
    value = schedule.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"trainer.lr_schedule.{key}={value!r}: give a whole number of steps, at least 1")
    return value


# -- gradient clipping ---------------------------------------------------------------------------


def _with_grad(parameters: Iterable[Tensor]) -> list[Tensor]:
    return [p for p in parameters if p.grad is not None]


@torch.no_grad()
def grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """The L2 norm ``[]`` of all gradients together (parameters without one are skipped)."""
    grads = [p.grad for p in _with_grad(parameters)]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2)


@torch.no_grad()
def clip_global_norm(parameters: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """Scale all gradients together so that their joint norm is at most ``max_norm`` (None: no
    clipping); returns the joint norm before clipping (torch's ``clip_grad_norm_``)."""
    params = _with_grad(parameters)
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)


@torch.no_grad()
def clip_per_parameter(parameters: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """DINO's clipping (``utils.clip_gradients``, facebookresearch/dino utils.py 132-141): each
    parameter's gradient on its own is scaled by ``max_norm / (norm + 1e-6)`` where that is below 1,
    so a large gradient in one layer does not shrink every other layer's. Returns the joint norm of
    all gradients before clipping (what the engine logs and checks for non-finite values)."""
    params = _with_grad(parameters)
    if not params:
        return torch.zeros(())
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads, 2)  # each parameter's gradient norm, before clipping
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2)
    if max_norm is not None:
        for norm, grad in zip(norms, grads):
            grad.mul_((max_norm / (norm.float() + 1e-6)).clamp(max=1.0).to(grad.dtype))
    return total
