"""Every loss computes in float32 under bf16 autocast: on inputs that come out of a bf16-autocast
linear layer, the loss under autocast equals the loss of the same inputs in float32 without it.

Under autocast a matmul or einsum runs in bf16 even on ``.float()`` inputs: CLIP's logits at scale
100 and DINO's teacher softmax at temperature 0.04 then differ from float32 by far more than 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memetrain.losses import cross_reconstruction_loss, focal_loss, masked_bce
from memetrain.losses.agreement import CassMMLoss, cosine_agreement_loss, variance_hinge
from memetrain.losses.consistency import diversity_loss, prediction_cosine, robust_consistency_loss
from memetrain.losses.contrastive import ClipLoss
from memetrain.losses.dino import DinoLoss

B = 8


def bf16_features(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Outputs of linear layers run under bf16 autocast (bf16 tensors, as a model hands them to a loss)."""
    torch.manual_seed(seed)
    outputs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for shape in shapes:
            layer = nn.Linear(16, shape[-1])
            outputs.append(layer(torch.randn(*shape[:-1], 16) * 2).detach())
    assert all(out.dtype == torch.bfloat16 for out in outputs)
    return outputs


def labels(size: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(-1, 2, (size, width), generator=generator)  # -1: missing


def dino_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    loss = DinoLoss(out_dim=teacher.shape[-1], student_temp=0.1)
    loss.center.copy_(torch.linspace(-0.5, 0.5, teacher.shape[-1]))
    return loss(student, teacher, teacher_temp=0.04)["dino_loss"]


def dino_center(teacher: torch.Tensor) -> torch.Tensor:
    loss = DinoLoss(out_dim=teacher.shape[-1], center_momentum=0.9)
    loss.update_center(teacher)
    return loss.center


def clip_loss(local_loss: bool):
    return lambda i, t: ClipLoss(local_loss)(i, t, torch.tensor(100.0))["contrastive_loss"]


def normalized(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


# name -> (input shapes, what the model does to them under autocast, the loss of the results)
LOSSES = {
    "clip_local_scale_100": ([(B, 32), (B, 32)], normalized, clip_loss(local_loss=True)),
    "clip_global_scale_100": ([(B, 32), (B, 32)], normalized, clip_loss(local_loss=False)),
    "dino_temp_0.04": ([(4, B, 64), (2, B, 64)], identity, dino_loss),
    "dino_center": ([(2, B, 64)], identity, dino_center),
    "cosine_agreement": ([(B, 32), (B, 32)], identity, cosine_agreement_loss),
    "variance_hinge": ([(B, 32)], identity, variance_hinge),
    "cass_mm": (
        [(B, 32), (B, 32), (B, 32)],
        identity,
        lambda c, v, t: sum(CassMMLoss(unimodal_weight=0.5, variance_weight=1.0)([c, v], t).values()),
    ),
    "prediction_cosine": ([(B, 3), (B, 3)], torch.sigmoid, prediction_cosine),
    "diversity": (
        [(B, 3), (B, 3)],
        torch.sigmoid,
        lambda a, b: diversity_loss(a, b, torch.arange(B) % 2 == 0),
    ),
    "robust_consistency": (
        [(B, 3), (B, 3)],
        torch.sigmoid,
        lambda a, b: robust_consistency_loss(a, b, torch.arange(B) % 3 > 0, 1.003),
    ),
    "bce": ([(B, 3)], identity, lambda x: masked_bce(x, labels(B, 3))),
    "focal": ([(B, 3)], identity, lambda x: focal_loss(x, labels(B, 3), gamma=2.0)),
    "reconstruction": (
        [(B, 32)] * 4,
        identity,
        lambda a, b, c, d: cross_reconstruction_loss(a, b, c, d)["reconstruction_loss"],
    ),
}


@pytest.mark.parametrize("name", LOSSES)
def test_a_loss_under_bf16_autocast_is_its_float32_value(name):
    shapes, prepare, loss = LOSSES[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = [prepare(x) for x in bf16_features(*shapes)]  # bf16, as the model hands them over
        assert all(x.dtype == torch.bfloat16 for x in inputs)
        got = loss(*inputs)
    expected = loss(*[x.float() for x in inputs])  # the same values in float32, no autocast
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
