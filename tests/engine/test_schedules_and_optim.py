"""Pure schedules and the AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memetrain.engine.optim import decay_groups
from memetrain.engine.schedules import cosine, linear_warmup, warmup_cosine
from memetrain.engine.trainer import accumulation_steps
from memetrain.errors import ConfigError


def test_warmup_cosine_hand_values():
    assert warmup_cosine(0, 100, 10, peak=1.0, final=0.0) == 0.0
    assert warmup_cosine(5, 100, 10, peak=1.0, final=0.0) == 0.5
    assert warmup_cosine(10, 100, 10, peak=1.0, final=0.0) == 1.0
    # half-way through the 90 cosine steps: (1 + cos(pi/2)) / 2 = 0.5
    assert warmup_cosine(55, 100, 10, peak=1.0, final=0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, peak=1.0, final=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 10, peak=1.0, final=0.1) == pytest.approx(0.1)


def test_cosine_and_linear_warmup():
    assert cosine(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine(10, 10, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine(5, 10, 0.0, 2.0) == pytest.approx(1.0 - math.cos(math.pi / 2))
    assert linear_warmup(0, 30, 0.04, 0.07) == 0.04
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(31, 30, 0.04, 0.07) == 0.07


def test_decay_groups_skip_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = decay_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 4])]
    assert sorted(p.numel() for p in no_decay["params"]) == [2, 8, 8, 8]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_accumulation_keeps_the_global_batch():
    assert accumulation_steps(64, 16, 2) == 2
    assert accumulation_steps(64, 32, 2) == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        accumulation_steps(64, 24, 2)
