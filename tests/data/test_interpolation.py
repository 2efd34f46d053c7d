"""Every view resizes with the run's one interpolation (``data.interpolation``), checked against
torch's own antialiased resampling of the same image; an unknown name is refused naming the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as functional

from memetrain.data.transforms import Resize, build_view
from memetrain.errors import ConfigError

SIZE = 24


def sharp_image() -> torch.Tensor:
    """A 48 x 48 image of 4 px squares in random colours: edges on which the filters differ."""
    blocks = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)


def reference(image: torch.Tensor, mode: str) -> torch.Tensor:
    """torch's antialiased resize of the float image, rounded back to uint8."""
    out = functional.interpolate(image[None].float(), size=(SIZE, SIZE), mode=mode, antialias=True)
    return out[0].round().clamp(0, 255)


# each view with everything random switched off: a resize (or a crop of the whole image) of the meme
PLAIN_VIEWS = {
    "resize": {"size": SIZE},
    "assignment": {"size": SIZE, "degrees": 0.0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0},
    "cass": {"size": SIZE, "flip_p": 0.0, "apply_p": 0.0},
    "two_views": {"size": SIZE, "scale": (1.0, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0},
    "multicrop": {"global_size": SIZE, "local_size": SIZE, "local_crops": 1, "global_scale": (1.0, 1.0),
                  "local_scale": (1.0, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0},
}  # fmt: skip


@pytest.mark.parametrize("name", PLAIN_VIEWS)
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_each_view_resizes_with_the_interpolation_it_is_given(name, mode):
    view = build_view(name, **PLAIN_VIEWS[name], interpolation=mode)
    out = view(sharp_image(), np.random.default_rng(0))
    for image in out if isinstance(out, list) else [out]:
        assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        # uint8 resampling rounds (and clamps bicubic's overshoot) between its two separable passes:
        # within 3 of the float reference, where the two filters differ by over 20 on these edges
        assert (image.float() - reference(sharp_image(), mode)).abs().max() <= 3
        other = "bilinear" if mode == "bicubic" else "bicubic"
        assert (image.float() - reference(sharp_image(), other)).abs().max() > 15


def test_views_resize_bilinearly_unless_told():
    assert torch.equal(Resize(SIZE)(sharp_image()), Resize(SIZE, "bilinear")(sharp_image()))


def test_an_unknown_interpolation_names_the_option_and_the_choices():
    with pytest.raises(
        ConfigError, match=r"^data.interpolation='lanczos': choose auto .*bilinear, bicubic, nearest$"
    ):
        Resize(SIZE, "lanczos")
