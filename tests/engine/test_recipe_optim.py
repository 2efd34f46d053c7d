"""The recipe pieces of memetrain/engine/optim.py against hand-computed values and torch's own
schedulers (independent references): per-parameter clipping (DINO's utils.clip_gradients), the
learning-rate schedules the studies' code steps, and the optimizers they build."""

from __future__ import annotations

import math

import pytest
import torch

from memetrain.engine.optim import build_optimizer, clip_global_norm, clip_per_parameter, lr_at
from memetrain.errors import ConfigError

TRAINER = {"lr": 1e-3, "min_lr": 1e-6, "warmup_steps": 0, "betas": [0.9, 0.999], "eps": 1e-8,
           "strategy": "single", "deepspeed": {"optimizer": "torch"}}  # fmt: skip


def _params(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for grad in grads:
        p = torch.nn.Parameter(torch.zeros(len(grad)))
        p.grad = torch.tensor(grad)
        params.append(p)
    return params


def test_per_parameter_clipping_by_hand():
    # norms 5 and 0.5; clip 1: the first is scaled by 1 / (5 + 1e-6), the second is left alone
    big, small, none = _params([3.0, 4.0], [0.3, 0.4], [1.0])
    none.grad = None
    total = clip_per_parameter([big, small, none], 1.0)
    assert total.item() == pytest.approx(math.sqrt(25 + 0.25))
    assert big.grad.tolist() == pytest.approx([3 / (5 + 1e-6), 4 / (5 + 1e-6)])
    assert small.grad.tolist() == pytest.approx([0.3, 0.4])
    assert none.grad is None


def test_global_clipping_scales_everything_together():
    big, small = _params([3.0, 4.0], [0.3, 0.4])
    total = clip_global_norm([big, small], 1.0)
    norm = math.sqrt(25.25)
    assert total.item() == pytest.approx(norm)
    assert small.grad.tolist() == pytest.approx([0.3 / norm, 0.4 / norm], rel=1e-5)


def test_per_parameter_clipping_without_a_bound_only_measures():
    (p,) = _params([30.0, 40.0])
    assert clip_per_parameter([p], None).item() == pytest.approx(50.0)
    assert p.grad.tolist() == [30.0, 40.0]


def _torch_lrs(scheduler_factory, steps: int, lr: float) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = scheduler_factory(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_schedule_matches_torch_steplr():
    trainer = {**TRAINER, "lr": 1e-4, "lr_schedule": {"kind": "step", "step_every": 12, "gamma": 0.93}}
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 12, 0.93), 60, 1e-4)
    assert [lr_at(s, 60, trainer) for s in range(60)] == pytest.approx(expected)
    assert lr_at(25, 60, trainer) == pytest.approx(1e-4 * 0.93**2)  # by hand


def test_multistep_schedule_matches_torch():
    trainer = {**TRAINER, "lr_schedule": {"kind": "multistep", "milestones": [5, 10, 15], "gamma": 0.5}}
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 10, 15], 0.5), 20, 1e-3)
    assert [lr_at(s, 20, trainer) for s in range(20)] == pytest.approx(expected)


def test_cosine_annealing_is_periodic_like_the_cass_code():
    # CASS.ipynb steps CosineAnnealingLR(T_max=16, eta_min=1e-6) every batch and never resets it
    trainer = {**TRAINER, "lr_schedule": {"kind": "cosine_annealing", "t_max": 16}}
    expected = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=16, eta_min=1e-6), 70, 1e-3
    )
    assert [lr_at(s, 70, trainer) for s in range(70)] == pytest.approx(expected, rel=1e-6)
    assert lr_at(16, 70, trainer) == pytest.approx(1e-6)  # by hand: the floor at T_max
    assert lr_at(32, 70, trainer) == pytest.approx(1e-3)  # and back at 2 T_max
    assert lr_at(8, 70, trainer) == pytest.approx((1e-3 + 1e-6) / 2)


def test_warmup_linear_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    trainer = {**TRAINER, "lr": 1e-5, "warmup_steps": 20, "lr_schedule": {"kind": "warmup_linear"}}
    expected = _torch_lrs(lambda o: get_linear_schedule_with_warmup(o, 20, 200), 200, 1e-5)
    assert [lr_at(s, 200, trainer) for s in range(200)] == pytest.approx(expected, rel=1e-6, abs=1e-15)


def test_default_schedule_is_the_engines_warmup_cosine():
    trainer = {**TRAINER, "warmup_steps": 10}
    assert lr_at(5, 100, trainer) == pytest.approx(5e-4)
    assert lr_at(100, 100, trainer) == pytest.approx(1e-6)


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_schedule.kind"):
        lr_at(0, 10, {**TRAINER, "lr_schedule": {"kind": "reduce_on_plateau"}})  # torch's; ours: plateau
    with pytest.raises(ConfigError, match="step_every"):
        lr_at(0, 10, {**TRAINER, "lr_schedule": {"kind": "step", "gamma": 0.9}})


def _one_step(kind: str, weight_decay: float) -> float:
    param = torch.nn.Parameter(torch.ones(1))
    optimizer = build_optimizer(
        [{"params": [param], "weight_decay": weight_decay}],
        {**TRAINER, "optimizer": kind, "lr": 0.1, "momentum": 0.9},
        torch.device("cpu"),
    )
    param.grad = torch.zeros(1)
    optimizer.step()
    return param.item()


def test_adam_decays_as_l2_and_adamw_decoupled():
    # zero gradient, weight 1, decay 0.1, lr 0.1. Adam (L2): the gradient becomes 0.1, and Adam's
    # first step moves by lr x sign = 0.1 (m/sqrt(v) = 1). AdamW: the weight shrinks by lr x wd = 1 %.
    assert _one_step("adam", 0.1) == pytest.approx(0.9, abs=1e-6)
    assert _one_step("adamw", 0.1) == pytest.approx(0.99, abs=1e-6)
    # SGD (L2 in the gradient, momentum buffer starts at the gradient): 1 - 0.1 x 0.1
    assert _one_step("sgd", 0.1) == pytest.approx(0.99, abs=1e-6)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="trainer.optimizer"):
        _one_step("lars", 0.0)
