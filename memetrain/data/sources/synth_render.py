"""What both SynthMemes corpora (``easy`` and ``hard``) draw with: seeded streams, palette, captions."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 85, 215),
    "green": (40, 165, 60),
    "yellow": (240, 205, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
COUNT_WORDS = {2: "TWO", 3: "THREE", 4: "FOUR", 5: "FIVE"}
SCENE_TINTS = {"circle": (1, -1, -1), "square": (-1, 1, -1), "triangle": (-1, -1, 1), "star": (1, 1, 1)}
"""Directions of background tints from grey: rose, green, blue and pale. They are the corners of a
regular tetrahedron, so every two tints are equally far apart in colour."""
CAPTION_SCALE = (0.8, 1.0)
"""Range of each caption's font size relative to the corpus size: line lengths vary with it."""


def rng(seed: int, pool: int, stream: int, index: int) -> np.random.Generator:
    """The random stream ``stream`` of meme ``index`` of ``pool``: any process draws the same."""
    return np.random.default_rng([seed, pool, stream, index])


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def font_size(image_size: int, lines: Sequence[str]) -> int:
    """The largest font size at which every line in ``lines`` fits 94 % of the width."""
    size = max(6, round(0.1 * image_size))
    while size > 6 and max(_font(size).getlength(line) for line in lines) > 0.94 * image_size:
        size -= 1
    return size


@lru_cache(maxsize=4096)
def caption(lines: tuple[str, ...], size: int) -> Image.Image:
    """White text with a black outline in meme style, each line centred, on a transparent block.

    Captions come from a small set, so each is drawn once per font size and then pasted (fast packing).
    """
    font = _font(size)
    stroke = max(1, round(size / 8))
    step = round(size * 1.1) + stroke
    width = max(round(font.getlength(line)) for line in lines) + 2 * stroke
    block = Image.new("RGBA", (width, step * len(lines) + stroke), (0, 0, 0, 0))
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        draw.text(
            (width / 2, i * step + stroke),
            line,
            font=font,
            fill="white",
            stroke_width=stroke,
            stroke_fill="black",
            anchor="ma",
        )
    return block


def place_caption(
    image: Image.Image, lines: tuple[str, ...], r: np.random.Generator, top: bool, base_size: int
) -> None:
    """Paste a caption at the top or bottom with a jittered font size and offset, as memes vary."""
    s = image.width
    block = caption(lines, max(6, round(base_size * r.uniform(*CAPTION_SCALE))))
    margin = max(1, s // 50)
    x = round(r.uniform(0, max(0, s - block.width)))
    y = margin + round(r.uniform(0, 2 * margin))
    image.paste(block, (x, y if top else s - y - block.height), block)
