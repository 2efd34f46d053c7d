"""The CASS code's training augmentation as a view (pranavsinghps1/CASS CASS.ipynb 108-112): resize,
two jitter blocks applied with probability 0.3 each, vertical and horizontal flips with 0.3 each;
checked by hand where the draws are forced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memetrain.data.transforms import CassAugment, build_view


def _quadrants() -> torch.Tensor:
    """A 4 x 4 image: top-left 10, top-right 20, bottom-left 30, bottom-right 40 (every channel)."""
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    image[:, :2, :2], image[:, :2, 2:], image[:, 2:, :2], image[:, 2:, 2:] = 10, 20, 30, 40
    return image


def test_both_flips_turn_the_image_half_round():
    view = CassAugment(4, flip_p=1.0, apply_p=0.0)  # no jitter blocks; both flips always
    out = view(_quadrants(), np.random.default_rng(0))
    assert out[0, 0, 0] == 40 and out[0, 0, 3] == 30 and out[0, 3, 0] == 20 and out[0, 3, 3] == 10


def test_without_flips_or_jitter_it_is_a_resize():
    view = CassAugment(4, flip_p=0.0, apply_p=0.0)
    assert torch.equal(view(_quadrants(), np.random.default_rng(0)), _quadrants())


@pytest.mark.parametrize("seed", range(5))
def test_defaults_are_the_cass_codes_and_stay_in_range(seed):
    view = build_view("cass", size=8)
    assert (view.flip_p, view.apply_p, view.degrees) == (0.3, 0.3, 10.0)
    out = view(torch.randint(0, 256, (3, 16, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)),
               np.random.default_rng(seed))  # fmt: skip
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8


def test_the_flip_probability_is_about_0_3():
    view = CassAugment(4, flip_p=0.3, apply_p=0.0)
    rng = np.random.default_rng(0)
    horizontal = sum(int(view(_quadrants(), rng)[0, 3, 3] in (30, 10)) for _ in range(2000))  # h-flipped
    assert abs(horizontal / 2000 - 0.3) < 0.04
