"""A method's own gradient clipping and a recipe's learning-rate schedule reach the optimizer step
(the trainer calls them; memetrain/engine/optim.py computes them, tested there)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memetrain.engine.optim import SCHEDULED_DECAY, lr_at
from memetrain.methods.clip_recipe import TOWER_PARTS, tower_groups
from memetrain.methods.supervised import Supervised
from tests.engine.test_trainer_steps import build, fit
from tests.helpers import run_launcher, tiny_run_overrides


class ClipsItsOwnWay(Supervised):
    """Supervised whose clipping zeroes every gradient and records what it was called with."""

    calls: list = []

    def clip_gradients(self, max_norm):
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None])
        )
        ClipsItsOwnWay.calls.append((max_norm, float(norm)))
        for p in self.parameters():
            p.grad = None if p.grad is None else torch.zeros_like(p.grad)
        return norm


def test_a_method_that_clips_its_own_way_is_called_and_its_clipping_holds(synth_shards, tmp_path):
    ClipsItsOwnWay.calls = []
    trainer = build(
        synth_shards, tmp_path, batch_size=8, accumulation=2, method_cls=ClipsItsOwnWay, grad_clip=3.0
    )
    before = {name: p.detach().clone() for name, p in trainer.method.named_parameters()}
    fit(trainer, tmp_path)
    assert [max_norm for max_norm, _ in ClipsItsOwnWay.calls] == [3.0] * 4, "once per optimizer step"
    assert all(norm > 0 for _, norm in ClipsItsOwnWay.calls)
    for name, p in trainer.method.named_parameters():  # zero gradients, no decay: AdamW leaves them
        torch.testing.assert_close(p, before[name], msg=name)


@pytest.mark.slow
def test_a_recipe_schedule_and_optimizer_reach_every_step(synth_shards, tmp_path):
    schedule = {"kind": "step", "gamma": 0.5, "step_every": 2}
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path, steps=6), "trainer.log_every=1",
        "trainer.optimizer=sgd", "trainer.momentum=0.5", "trainer.lr=0.04",
        "trainer.lr_schedule={kind:step,gamma:0.5,step_every:2}", "eval.protocols=[]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["train/lr"] for row in rows if "train/lr" in row]
    trainer = {"lr": 0.04, "min_lr": 0.0, "warmup_steps": 0, "lr_schedule": schedule}
    assert lrs == pytest.approx([lr_at(step, 6, trainer) for step in range(6)])
    assert lrs == pytest.approx([0.04, 0.04, 0.02, 0.02, 0.01, 0.01])
    state = torch.load(tmp_path / "checkpoints" / "step_0000006" / "optimizer.bin", weights_only=True)
    assert state["param_groups"][0]["momentum"] == 0.5 and "momentum_buffer" in next(
        iter(state["state"].values())
    )


@pytest.mark.slow
def test_a_method_that_clips_its_own_way_is_refused_under_deepspeed(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path, steps=2), "method=dino", "model=backbone_resnet18",
        "eval=probe", "trainer=deepspeed_zero2",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: method dino clips its gradients its own way" in result.stderr
    assert "train it with trainer=ddp or single" in result.stderr


def test_a_decay_schedule_from_zero_reaches_the_decayed_group_at_every_step(synth_shards, tmp_path):
    """trainer.weight_decay=0 -> weight_decay_end=0.4 (a schedule that starts at 0, as DINO's grows):
    the decay group gets the cosine value at each optimizer step, biases and norms none."""
    trainer = build(
        synth_shards, tmp_path, batch_size=16, accumulation=1, weight_decay=0.0, weight_decay_end=0.4
    )
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({group["name"]: group["weight_decay"] for group in trainer.optimizer.param_groups})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    fit(trainer, tmp_path)
    # half a cosine from 0 at step 0 towards 0.4 at step 4, written out
    expected = [0.4 - 0.2 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]
    assert [row["decay"] for row in seen] == pytest.approx(expected) and expected[0] == 0.0
    assert [row["no_decay"] for row in seen] == [0.0] * 4


def test_clip_tower_groups_schedule_the_heads_decay_and_keep_the_encoders_own():
    towers = torch.nn.ModuleDict(
        {
            "image_encoder": torch.nn.Linear(2, 2),
            "text_encoder": torch.nn.Linear(2, 2),
            "head": torch.nn.Linear(2, 2),
        }
    )
    groups = tower_groups(
        towers, dict.fromkeys(TOWER_PARTS, 1.0), weight_decay=0.1, encoder_weight_decay=0.01
    )
    scheduled = {
        group["name"]: (group["weight_decay"], group.get(SCHEDULED_DECAY, False)) for group in groups
    }
    assert scheduled == {"image_encoder": (0.01, False), "text_encoder": (0.01, False), "heads": (0.1, True)}


def test_trainer_grad_clip_limits_a_real_update(synth_shards, tmp_path):
    """Plain SGD (lr 1, no momentum or decay) moves the weights by exactly the clipped gradient: with
    trainer.grad_clip=0.01 far below the gradient's norm, each step moves them by a norm of 0.01."""
    trainer = build(
        synth_shards, tmp_path, batch_size=16, accumulation=1, grad_clip=0.01, lr=1.0, min_lr=1.0,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=1.0),
    )  # fmt: skip
    raw, clipped, moved = [], [], []
    grad_norm, step = trainer._grad_norm, trainer.optimizer.step

    def norm(tensors) -> float:
        return torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors])).item()

    def recording_grad_norm():
        raw.append(float(grad_norm()))  # the norm before clipping, as the trainer logs it
        return raw[-1]

    def measuring_step(*args, **kwargs):
        params = [p for p in trainer.method.parameters() if p.grad is not None]
        before = [p.detach().clone() for p in params]
        clipped.append(norm([p.grad for p in params]))
        step(*args, **kwargs)
        moved.append(norm([p.detach() - b for p, b in zip(params, before)]))

    trainer._grad_norm, trainer.optimizer.step = recording_grad_norm, measuring_step
    fit(trainer, tmp_path)
    assert len(raw) == len(clipped) == len(moved) == 4
    assert min(raw) > 0.05, f"the gradients must be far above the bound for the test to mean anything: {raw}"
    assert clipped == pytest.approx([0.01] * 4, rel=1e-4)
    assert moved == pytest.approx([0.01] * 4, rel=1e-4)
