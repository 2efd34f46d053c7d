"""Views: what a method sees of one meme image.

A view maps a decoded ``uint8`` image tensor ``[3, H, W]`` and a per-sample ``numpy`` generator to
one ``uint8`` tensor or a list of them (multi-view methods). It also says the size it decodes for
(``decode_size``: large JPEGs are decoded at a reduced scale) and whether it draws from the
generator (``random``; if not, it gets ``None``), and, if it can, which image sizes it returns
unchanged (``passes_through(height, width)``: the stream then skips calling it for images decoded
straight into their batch rows). Random parameters come only from that generator,
which the stream seeds from (seed, epoch, slot, position): augmentations are identical across
worker counts, restarts and resumes, and never touch the global RNGs. Batches stay ``uint8``
until the device, where :class:`memetrain.models.ImageNormalizer` turns them into floats (4x less
to copy and pin).

Memes carry their caption at the top and bottom, so the default resize squashes the whole image
to a square instead of centre-cropping the text away, and by default no view mirrors the image
(mirrored text is no longer the text). The studies' own augmentations are options of the views
that reproduce them: DINO's flip, Gaussian blur and solarisation (``multicrop``: ``flip_p``,
``blur``, ``solarize``; facebookresearch/dino main_dino.py 419-464) and the CASS code's flips,
perspective and affine jitter (``cass``; pranavsinghps1/CASS CASS.ipynb cell 4). A paper sweep sets
them; our own sweeps keep the captions unmirrored.

Every view resizes and crops with one ``interpolation`` (``data.interpolation``: a pretrained
tower's own, from its weights' config, unless the run names one; :func:`resize_filter`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from memetrain.errors import ConfigError

Image = torch.Tensor
INTERPOLATIONS = {
    "bilinear": F.InterpolationMode.BILINEAR,
    "bicubic": F.InterpolationMode.BICUBIC,
    "nearest": F.InterpolationMode.NEAREST,
}


def resize_filter(name: str) -> F.InterpolationMode:
    """The torchvision interpolation mode of ``data.interpolation`` (antialiased when shrinking)."""
    if name not in INTERPOLATIONS:
        raise ConfigError(
            f"data.interpolation={name!r}: choose auto (the pretrained image tower's own), "
            f"{', '.join(INTERPOLATIONS)}"
        )
    return INTERPOLATIONS[name]


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area at an aspect ratio in ``ratio``.

    Inception-style sampling (as torchvision's RandomResizedCrop): ten tries, then the whole image.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return 0, 0, height, width


def color_jitter(
    image: Image, rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> Image:
    """Brightness, contrast, saturation and hue jitter in a random order (as torchvision's ColorJitter)."""
    ops = [
        (F.adjust_brightness, brightness, 1.0),
        (F.adjust_contrast, contrast, 1.0),
        (F.adjust_saturation, saturation, 1.0),
        (F.adjust_hue, hue, 0.0),
    ]
    for index in rng.permutation(len(ops)):
        op, strength, center = ops[index]
        if strength > 0:
            image = op(image, float(rng.uniform(center - strength, center + strength)))
    return image


class Resize:
    """The whole meme squashed to ``size`` x ``size`` (evaluation and supervised training)."""

    random = False

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size, self.interpolation = size, interpolation
        self.filter = resize_filter(interpolation)
        self.decode_size = size

    def passes_through(self, height: int, width: int) -> bool:
        """Whether an image of this size is returned unchanged (the stream then need not call the view)."""
        return height == width == self.size

    def __call__(self, image: Image, rng: np.random.Generator | None = None) -> Image:
        if self.passes_through(*image.shape[-2:]):
            return image  # as F.resize would, without its dispatch (a few µs, per sample)
        return F.resize(image, [self.size, self.size], self.filter, antialias=True)


class AssignmentAugment:
    """The course-assignment augmentation: rotation within +-``degrees``, colour jitter, resize."""

    random = True

    def __init__(
        self,
        size: int,
        degrees: float = 2.0,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.05,
        interpolation: str = "bilinear",
    ):
        self.size, self.degrees = size, degrees
        self.filter = resize_filter(interpolation)
        self.jitter = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.decode_size = size

    def __call__(self, image: Image, rng: np.random.Generator) -> Image:
        image = F.resize(image, [self.size, self.size], self.filter, antialias=True)
        image = F.rotate(image, float(rng.uniform(-self.degrees, self.degrees)), F.InterpolationMode.BILINEAR)
        return color_jitter(image, rng, **self.jitter)


def gaussian_blur(image: Image, rng: np.random.Generator, radius: tuple[float, float] = (0.1, 2.0)) -> Image:
    """Gaussian blur with a standard deviation drawn uniformly from ``radius`` (DINO's
    ``utils.GaussianBlur``: PIL's GaussianBlur, whose radius is the standard deviation; here
    torchvision's kernel of 3 standard deviations each side)."""
    sigma = float(rng.uniform(*radius))
    kernel = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def solarize(image: Image) -> Image:
    """Every channel value of 128 or more inverted (PIL's ``ImageOps.solarize`` at its default 128)."""
    return F.solarize(image, 128)


class _RandomCrops:
    """Random resized crops with colour jitter and grayscale, as in SimCLR/DINO; the flip, blur and
    solarisation of DINO's crops are options (off by default: mirrored captions are not the captions)."""

    random = True

    def __init__(
        self,
        jitter_p: float,
        grayscale_p: float,
        jitter: tuple[float, float, float, float],
        flip_p: float = 0.0,
        interpolation: str = "bilinear",
    ):
        self.jitter_p, self.grayscale_p, self.flip_p = jitter_p, grayscale_p, flip_p
        self.filter = resize_filter(interpolation)
        self.jitter = dict(zip(("brightness", "contrast", "saturation", "hue"), jitter))

    def crop(
        self,
        image: Image,
        size: int,
        scale: tuple[float, float],
        rng: np.random.Generator,
        blur_p: float = 0.0,
        solarize_p: float = 0.0,
    ) -> Image:
        """One crop, in DINO's order: resized crop, flip, colour jitter, grayscale, blur, solarise.
        A probability of 0 draws nothing from ``rng`` (views without these options are unchanged)."""
        top, left, h, w = random_resized_crop_box(
            image.shape[-2], image.shape[-1], scale, (3 / 4, 4 / 3), rng
        )
        view = F.resized_crop(image, top, left, h, w, [size, size], self.filter, antialias=True)
        if self.flip_p > 0 and rng.random() < self.flip_p:
            view = F.horizontal_flip(view)
        if rng.random() < self.jitter_p:
            view = color_jitter(view, rng, **self.jitter)
        if rng.random() < self.grayscale_p:
            view = F.rgb_to_grayscale(view, num_output_channels=3)
        if blur_p > 0 and rng.random() < blur_p:
            view = gaussian_blur(view, rng)
        if solarize_p > 0 and rng.random() < solarize_p:
            view = solarize(view)
        return view


class TwoViews(_RandomCrops):
    """Two independent random crops of one meme (CASS, SimCLR-style objectives)."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.4, 1.0),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        interpolation: str = "bilinear",
    ):
        super().__init__(jitter_p, grayscale_p, tuple(jitter), interpolation=interpolation)
        self.size, self.scale = size, tuple(scale)
        self.decode_size = size

    def __call__(self, image: Image, rng: np.random.Generator) -> list[Image]:
        return [self.crop(image, self.size, self.scale, rng) for _ in range(2)]


class MultiCrop(_RandomCrops):
    """DINO multi-crop: 2 global crops (``global_scale``) and ``local_crops`` small ones (``local_scale``).

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (2021), sec. 3.1. DINO's
    ``DataAugmentationDINO`` (facebookresearch/dino main_dino.py 419-464) also flips every crop
    (``flip_p`` 0.5), blurs the first global crop always, the second with probability 0.1 and each
    local crop with 0.5 (``blur``: [first global, second global, local]), and solarises the second
    global crop with probability 0.2 (``solarize``, same order). Our defaults leave all three off.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        local_crops: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        flip_p: float = 0.0,
        blur: tuple[float, float, float] = (0.0, 0.0, 0.0),
        solarize: tuple[float, float, float] = (0.0, 0.0, 0.0),
        interpolation: str = "bilinear",
    ):
        super().__init__(jitter_p, grayscale_p, tuple(jitter), flip_p, interpolation)
        self.global_size, self.local_size, self.local_crops = global_size, local_size, local_crops
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        for name, probabilities in (("blur", blur), ("solarize", solarize)):
            if len(probabilities) != 3 or not all(0 <= p <= 1 for p in probabilities):
                raise ConfigError(
                    f"method.view.{name}={list(probabilities)}: give 3 probabilities in [0, 1] "
                    "(first global crop, second global crop, local crops); DINO's: blur [1.0, 0.1, 0.5], "
                    "solarize [0.0, 0.2, 0.0]"
                )
        self.blur, self.solarize = tuple(blur), tuple(solarize)
        self.decode_size = global_size

    def __call__(self, image: Image, rng: np.random.Generator) -> list[Image]:
        (blur_1, blur_2, blur_local), (solar_1, solar_2, solar_local) = self.blur, self.solarize
        views = [
            self.crop(image, self.global_size, self.global_scale, rng, blur_1, solar_1),
            self.crop(image, self.global_size, self.global_scale, rng, blur_2, solar_2),
        ]
        views += [
            self.crop(image, self.local_size, self.local_scale, rng, blur_local, solar_local)
            for _ in range(self.local_crops)
        ]
        return views


class CassAugment:
    """The CASS code's training augmentation (pranavsinghps1/CASS, CASS.ipynb cell 4), one view for
    both networks: resize to ``size``; with probability 0.3 colour jitter (0.2, 0.2, 0.2) then a random
    perspective (distortion 0.2, itself applied with probability 0.5); with probability 0.3 colour
    jitter then a random rotation within +-``degrees`` (torchvision's RandomAffine(degrees=10)); a
    vertical and a horizontal flip, each with probability ``flip_p`` (0.3 there; 0: never mirror the
    captions)."""

    random = True

    def __init__(
        self,
        size: int,
        degrees: float = 10.0,
        flip_p: float = 0.3,
        apply_p: float = 0.3,
        interpolation: str = "bilinear",
    ):
        self.size, self.degrees, self.flip_p, self.apply_p = size, degrees, flip_p, apply_p
        self.filter = resize_filter(interpolation)
        self.jitter = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0)
        self.decode_size = size

    def __call__(self, image: Image, rng: np.random.Generator) -> Image:
        image = F.resize(image, [self.size, self.size], self.filter, antialias=True)
        if rng.random() < self.apply_p:
            image = color_jitter(image, rng, **self.jitter)
            if rng.random() < 0.5:
                image = _random_perspective(image, 0.2, rng)
        if rng.random() < self.apply_p:
            image = color_jitter(image, rng, **self.jitter)
            image = F.rotate(
                image, float(rng.uniform(-self.degrees, self.degrees)), F.InterpolationMode.BILINEAR
            )
        if self.flip_p > 0 and rng.random() < self.flip_p:
            image = F.vertical_flip(image)
        if self.flip_p > 0 and rng.random() < self.flip_p:
            image = F.horizontal_flip(image)
        return image


def _random_perspective(image: Image, distortion: float, rng: np.random.Generator) -> Image:
    """torchvision's RandomPerspective corners: each moves inwards by up to ``distortion`` x half the side."""
    height, width = image.shape[-2:]
    dx, dy = int(distortion * width / 2), int(distortion * height / 2)
    top_left = [int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))]
    top_right = [int(width - 1 - rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))]
    bottom_right = [int(width - 1 - rng.integers(0, dx + 1)), int(height - 1 - rng.integers(0, dy + 1))]
    bottom_left = [int(rng.integers(0, dx + 1)), int(height - 1 - rng.integers(0, dy + 1))]
    start = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
    return F.perspective(image, start, [top_left, top_right, bottom_right, bottom_left])


VIEWS = {
    "resize": Resize,
    "assignment": AssignmentAugment,
    "two_views": TwoViews,
    "multicrop": MultiCrop,
    "cass": CassAugment,
}


def build_view(name: str, **options) -> Resize | AssignmentAugment | TwoViews | MultiCrop | CassAugment:
    if name not in VIEWS:
        raise ConfigError(f"unknown view {name!r}; choose one of {', '.join(VIEWS)}")
    return VIEWS[name](**options)
