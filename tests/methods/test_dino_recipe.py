"""DINO's reference recipe pieces (facebookresearch/dino 7c446df): per-parameter gradient clipping
(utils.py 132-141), the frozen last layer's gradients dropped (utils.py 144-149: AdamW then neither
decays nor steps it), stochastic depth on the student ViT only (main_dino.py 161-166), and the
crops' flip, Gaussian blur and solarisation (main_dino.py 419-464); each against a naive
reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.layers import DropPath

from memetrain.data.transforms import MultiCrop, gaussian_blur, solarize
from memetrain.errors import ConfigError
from tests.methods.test_dino import crops, dino


def naive_clip_gradients(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """DINO's rule, one parameter at a time, in plain Python arithmetic."""
    out = []
    for grad in grads:
        norm = math.sqrt(sum(float(v) ** 2 for v in grad.flatten()))
        coef = clip / (norm + 1e-6)
        out.append(grad * coef if coef < 1 else grad.clone())
    return out


def test_per_parameter_clipping_matches_dinos_rule_and_drops_the_frozen_last_layer():
    method = dino(grad_clip_mode="per_parameter", freeze_last_layer_steps=1)
    method.before_step(0, 10)  # the last layer is frozen at step 0
    losses, _ = method.training_step(crops())
    (losses["dino_loss"] * 1e4).backward()  # large gradients: most parameters get clipped
    trained = [(n, p) for n, p in method.student.named_parameters() if p.grad is not None]
    before = [p.grad.clone() for _, p in trained]
    expected = naive_clip_gradients(before, 3.0)
    norm = method.clip_gradients(3.0)
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in before))
    assert norm.item() == pytest.approx(total, rel=1e-5)
    for (name, param), want in zip(trained, expected):
        if "last_layer" in name:
            assert param.grad is None, name  # dropped, not zeroed
        else:
            torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-8)
            assert param.grad.norm() <= 3.0 + 1e-4


def test_a_frozen_last_layer_is_neither_decayed_nor_stepped_by_adamw():
    method = dino(grad_clip_mode="per_parameter", freeze_last_layer_steps=1)
    last = method.student["head"].last_layer.parametrizations.weight.original1
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.4), lr=0.1)
    method.before_step(0, 10)
    losses, _ = method.training_step(crops())
    losses["dino_loss"].backward()
    before = last.detach().clone()
    method.clip_gradients(3.0)
    optimizer.step()
    assert torch.equal(last, before)  # zeroed gradients would still have let AdamW decay it by 4 %
    assert last not in optimizer.state  # no moment and no step count for it
    method.before_step(1, 10)  # thawed: it trains
    losses, _ = method.training_step(crops())
    losses["dino_loss"].backward()
    method.clip_gradients(3.0)
    assert last.grad is not None


def test_global_clipping_is_ours_and_the_default():
    method = dino()
    losses, _ = method.training_step(crops())
    (losses["dino_loss"] * 1e4).backward()
    grads = [p.grad.clone() for p in method.student.parameters() if p.grad is not None]
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads))
    method.clip_gradients(3.0)
    after = [p.grad for p in method.student.parameters() if p.grad is not None]
    for grad, old in zip(after, grads):  # one common factor 3 / total
        torch.testing.assert_close(grad, old * (3.0 / (total + 1e-6)), rtol=1e-4, atol=1e-9)


def test_drop_path_rises_linearly_over_the_students_vit_blocks_and_spares_the_teacher():
    method = dino("test_vit", drop_path_rate=0.1)
    student, teacher = method.student["backbone"].model.blocks, method.teacher["backbone"].model.blocks
    rates = np.linspace(0, 0.1, len(student))  # DINO's torch.linspace(0, drop_path_rate, depth)
    for block, rate in zip(student, rates):
        if rate == 0:
            assert isinstance(block.drop_path1, torch.nn.Identity)
        else:
            assert isinstance(block.drop_path1, DropPath) and block.drop_path1.drop_prob == pytest.approx(
                rate
            )
            assert block.drop_path2.drop_prob == pytest.approx(rate)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in teacher)


def test_drop_path_on_a_resnet_is_refused():
    with pytest.raises(ConfigError, match="drop_path_rate"):
        dino("test_resnet", drop_path_rate=0.1)


# -- the crops ----------------------------------------------------------------------------------


def test_solarize_inverts_values_from_128_by_hand():
    image = torch.tensor([0, 127, 128, 200, 255], dtype=torch.uint8).view(1, 1, 5).expand(3, 1, 5)
    assert solarize(image)[0, 0].tolist() == [0, 127, 127, 55, 0]


def naive_gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian of radius 3 sigma, reflect padding, one channel, loops."""
    radius = math.ceil(3 * sigma)
    weights = [math.exp(-(x * x) / (2 * sigma * sigma)) for x in range(-radius, radius + 1)]
    weights = [w / sum(weights) for w in weights]
    height, width = image.shape

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    rows = np.zeros_like(image, dtype=float)
    for y in range(height):
        for x in range(width):
            rows[y, x] = sum(w * image[y, reflect(x + k - radius, width)] for k, w in enumerate(weights))
    out = np.zeros_like(rows)
    for y in range(height):
        for x in range(width):
            out[y, x] = sum(w * rows[reflect(y + k - radius, height), x] for k, w in enumerate(weights))
    return out


def test_gaussian_blur_matches_a_naive_convolution():
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 12, 12), dtype=np.uint8))
    sigma = np.random.default_rng(5).uniform(0.1, 2.0)  # what the view draws from this generator
    blurred = gaussian_blur(image, np.random.default_rng(5))
    expected = naive_gaussian_blur(image[0].double().numpy(), sigma)
    assert np.abs(blurred[0].double().numpy() - expected).max() <= 1.0  # uint8 rounding


def _halves(size: int = 16) -> torch.Tensor:
    """Left half 100, right half 200, every channel."""
    image = torch.full((3, size, size), 100, dtype=torch.uint8)
    image[:, :, size // 2 :] = 200
    return image


def test_dinos_crops_flip_blur_and_solarise_with_their_probabilities():
    # scale (1, 1): every crop is the whole image (no aspect ratio but 1 fits), so what changes is
    # the flip, blur and solarisation alone; jitter and grayscale off
    view = MultiCrop(
        global_size=16, local_size=8, local_crops=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
        jitter_p=0.0, grayscale_p=0.0, flip_p=1.0, blur=(0.0, 0.0, 0.0), solarize=(0.0, 1.0, 0.0),
    )  # fmt: skip
    views = view(_halves(), np.random.default_rng(0))
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16), (16, 16), (8, 8), (8, 8)]
    first, second = views[0][0], views[1][0]
    assert first[:, 0].unique().tolist() == [200] and first[:, -1].unique().tolist() == [100]  # flipped
    assert second[:, 0].unique().tolist() == [55] and second[:, -1].unique().tolist() == [
        100
    ]  # and solarised


def test_the_default_crops_neither_flip_nor_blur():
    view = MultiCrop(global_size=16, local_size=8, local_crops=1, global_scale=(1.0, 1.0),
                     local_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0)  # fmt: skip
    first = view(_halves(), np.random.default_rng(0))[0][0]
    assert first[:, 0].unique().tolist() == [100] and first[:, -1].unique().tolist() == [200]


def test_bad_crop_probabilities_are_refused():
    with pytest.raises(ConfigError, match="method.view.blur"):
        MultiCrop(blur=(1.0, 0.1))
