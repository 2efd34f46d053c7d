"""SynthMemes: the procedurally generated meme corpus that is memetrain's embedded default dataset.

Each meme is a scene of ``count`` shapes of one class (circle, square, triangle, star) in one colour on
a textured background, with a two-part caption drawn on it in meme style. The top caption "targets" one
shape class through its adjectives ("keep the round ones out" targets circles); the bottom one names the
shapes' count and colour ("three red ones"), which both modalities share but which carry no label.
A meme is hateful exactly when its top caption is shown on its target class, so neither the text nor the
image alone predicts the label (the Hateful Memes benign-confounder design). A block design makes the
balance exact: in every cycle of ``CYCLE`` memes each phrase is shown K-1 times on its target class and
once on each other class, in a seeded order. Everything is a pure function of (seed, pool, index), seeded
through numpy's SeedSequence, so any process renders the same meme and a longer corpus extends a shorter.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from memetrain.data.images import encode
from memetrain.data.records import HATEFUL_LABELS, IMAGE_FORMATS, Entry, MemeRecord
from memetrain.errors import ConfigError

CLASSES = ("circle", "square", "triangle", "star")
ADJECTIVES = {
    "circle": ("round", "bubbly", "rolling", "curvy"),
    "square": ("boxy", "blocky", "chunky", "stocky"),
    "triangle": ("pointy", "wedgy", "slanted", "jagged"),
    "star": ("sparkly", "twinkly", "glittery", "shiny"),
}
TEMPLATES = (
    "{} ones are not welcome here",
    "keep the {} ones out",
    "nobody wants the {} ones",
    "the {} ones ruin everything",
)
PHRASES = tuple((t.format(a).upper(), c) for c in CLASSES for a in ADJECTIVES[c] for t in TEMPLATES)
"""(top caption, target class): 16 phrases per class."""

COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 85, 215),
    "green": (40, 165, 60),
    "yellow": (240, 205, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
COUNT_WORDS = {2: "TWO", 3: "THREE", 4: "FOUR", 5: "FIVE"}
SHOWINGS = 2 * (len(CLASSES) - 1)
"""Memes per phrase per cycle: K-1 on its target class (hateful), one on each other class (benign)."""
CYCLE = len(PHRASES) * SHOWINGS
"""Labels are exactly balanced within every phrase and every image class over each cycle."""

_ORDER, _ATTRIBUTES, _SPLIT, _LAYOUT = range(4)  # independent random streams
_POOLS = {"labeled": 0, "unlabeled": 1}


@dataclass(frozen=True)
class MemeFactors:
    """Everything that defines one meme; ``render_meme`` draws it."""

    seed: int
    pool: int
    index: int
    image_class: str
    target_class: str
    top: str
    colour: str
    count: int

    @property
    def bottom(self) -> str:
        return f"{COUNT_WORDS[self.count]} {self.colour.upper()} ONES"

    @property
    def text(self) -> str:
        """Exactly the words drawn on the image, top caption first."""
        return f"{self.top} {self.bottom}"

    @property
    def hateful(self) -> int:
        return int(self.image_class == self.target_class)


def _rng(seed: int, pool: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, pool, stream, index])


@lru_cache(maxsize=64)
def _cycle_order(seed: int, pool: int, cycle: int) -> np.ndarray:
    return _rng(seed, pool, _ORDER, cycle).permutation(CYCLE)


def meme_factors(seed: int, index: int, unlabeled: bool = False) -> MemeFactors:
    """The factors of meme ``index``; the unlabeled pool is a separate stream of the same generator."""
    pool = _POOLS["unlabeled" if unlabeled else "labeled"]
    slot = int(_cycle_order(seed, pool, index // CYCLE)[index % CYCLE])
    top, target = PHRASES[slot // SHOWINGS]
    showing = slot % SHOWINGS - (len(CLASSES) - 1)  # negative: on the target class
    image_class = target if showing < 0 else [c for c in CLASSES if c != target][showing]
    rng = _rng(seed, pool, _ATTRIBUTES, index)  # never sees the label: colour and count stay neutral
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    count = int(rng.integers(min(COUNT_WORDS), max(COUNT_WORDS) + 1))
    return MemeFactors(seed, pool, index, image_class, target, top, colour, count)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(words: list[str], font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines = [words[0]]
    for word in words[1:]:
        candidate = f"{lines[-1]} {word}"
        if font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


@lru_cache(maxsize=1024)
def _caption(text: str, image_size: int) -> Image.Image:
    """White text with a black outline, centred, in at most two lines, as large as fits the width.

    Captions come from a small set, so each is drawn once per size and then pasted (fast packing).
    """
    width = 0.94 * image_size
    size = max(8, round(0.1 * image_size))
    while True:
        font = _font(size)
        lines = _wrap(text.split(), font, width)
        if size <= 6 or (len(lines) <= 2 and max(font.getlength(line) for line in lines) <= width):
            break
        size -= 1
    stroke = max(1, round(size / 8))
    step = round(size * 1.1) + stroke
    block = Image.new("RGBA", (image_size, step * len(lines) + stroke), (0, 0, 0, 0))
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        xy = (image_size / 2, i * step + stroke)
        draw.text(xy, line, font=font, fill="white", stroke_width=stroke, stroke_fill="black", anchor="ma")
    return block


def _shape(kind: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a rotated square, triangle or five-pointed star around (x, y)."""
    if kind == "square":
        radii, start = [1.2 * r] * 4, np.pi / 4
    elif kind == "triangle":
        radii, start = [1.3 * r] * 3, -np.pi / 2
    else:
        radii, start = [1.3 * r, 0.55 * r] * 5, -np.pi / 2
    angles = start + angle + 2 * np.pi * np.arange(len(radii)) / len(radii)
    return [(x + rad * np.cos(a), y + rad * np.sin(a)) for rad, a in zip(radii, angles)]


def render_meme(factors: MemeFactors, image_size: int = 224) -> Image.Image:
    """The meme as an RGB image: textured background, the shapes, then the captions on top."""
    s = image_size
    rng = _rng(factors.seed, factors.pool, _LAYOUT, factors.index)
    base = 255 * np.array(colorsys.hsv_to_rgb(rng.random(), 0.2, 0.7))  # muted, so shapes stand out
    light = rng.normal(0, 25, (4, 4, 1)) + np.linspace(-20, 20, 4)[:, None, None]  # blotches, gradient
    noise = base + light + rng.normal(0, 12, (4, 4, 3))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).resize((s, s), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    for _ in range(factors.count):
        for _attempt in range(30):  # avoid overlaps so the count stays visible, give up if crowded
            r = s * rng.uniform(0.065, 0.115)
            x, y = rng.uniform(r * 1.3, s - r * 1.3), rng.uniform(0.27 * s, 0.73 * s)
            if all(np.hypot(x - px, y - py) > 1.3 * (r + pr) for px, py, pr in placed):
                break
        placed.append((x, y, r))
        jitter = np.add(COLOURS[factors.colour], rng.integers(-20, 21, 3))
        fill = tuple(int(c) for c in jitter.clip(0, 255))
        outline, line = tuple(c // 3 for c in fill), max(1, s // 100)
        if factors.image_class == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline, width=line)
        else:
            points = _shape(factors.image_class, x, y, r, rng.uniform(-0.35, 0.35))
            draw.polygon(points, fill=fill, outline=outline, width=line)
    margin = max(1, s // 50)
    top, bottom = _caption(factors.top, s), _caption(factors.bottom, s)
    image.paste(top, (0, margin), top)
    image.paste(bottom, (0, s - margin - bottom.height), bottom)
    return image


class SynthMemes:
    """``source=synth``: ``count`` labeled memes split by seeded draws, plus ``unlabeled`` pool memes."""

    name = "synth"
    label_names = HATEFUL_LABELS
    main_label = "hateful"

    def __init__(
        self,
        count: int = 2000,
        image_size: int = 224,
        seed: int = 0,
        splits: dict[str, float] | None = None,
        unlabeled: int = 0,
        image_format: str = "jpg",
        jpeg_quality: int = 90,
    ):
        splits = {"train": 0.8, "dev": 0.1, "test": 0.1} if splits is None else dict(splits)
        if count < 1:
            raise ConfigError(f"synth count is {count}; it must be at least 1")
        if image_size < 32:
            raise ConfigError(f"synth image_size is {image_size}; it must be at least 32 pixels")
        if seed < 0 or unlabeled < 0:
            raise ConfigError(f"synth seed ({seed}) and unlabeled ({unlabeled}) must not be negative")
        if image_format not in IMAGE_FORMATS:
            raise ConfigError(
                f"synth image_format is {image_format!r}; use one of {', '.join(IMAGE_FORMATS)}"
            )
        if not 1 <= jpeg_quality <= 100:
            raise ConfigError(f"synth jpeg_quality is {jpeg_quality}; it must be between 1 and 100")
        if "unlabeled" in splits or any(not 0 <= f <= 1 for f in splits.values()):
            raise ConfigError(
                f"synth splits {splits} need fractions in [0, 1] and no split named 'unlabeled'"
            )
        if not splits or abs(sum(splits.values()) - 1) > 1e-6:
            raise ConfigError(f"synth split fractions {splits} sum to {sum(splits.values()):g}, not 1")
        self.count, self.image_size, self.seed, self.unlabeled = count, image_size, seed, unlabeled
        self.splits, self.image_format, self.jpeg_quality = splits, image_format, jpeg_quality
        self._names, self._bounds = list(splits), np.cumsum(list(splits.values()))

    def split_of(self, index: int) -> str:
        """One seeded draw per index, so splits do not change when ``count`` grows."""
        u = _rng(self.seed, _POOLS["labeled"], _SPLIT, index).random()
        return self._names[min(int(np.searchsorted(self._bounds, u, side="right")), len(self._names) - 1)]

    def entries(self) -> Iterator[Entry]:
        for unlabeled, n in ((False, self.count), (True, self.unlabeled)):
            for index in range(n):
                f = meme_factors(self.seed, index, unlabeled)
                yield Entry(
                    id=f"synthu{index:07d}" if unlabeled else f"synth{index:07d}",
                    split="unlabeled" if unlabeled else self.split_of(index),
                    ref=index,
                    text=f.text,
                    labels={} if unlabeled else {"hateful": f.hateful},
                    meta={
                        "image_class": f.image_class,
                        "target_class": f.target_class,
                        "colour": f.colour,
                        "count": f.count,
                    },
                )

    def load(self, entry: Entry) -> MemeRecord:
        factors = meme_factors(self.seed, entry.ref, entry.split == "unlabeled")
        image = render_meme(factors, self.image_size)
        return MemeRecord(
            id=entry.id,
            image=encode(image, self.image_format, self.jpeg_quality),
            image_format=self.image_format,
            text=factors.text,
            labels=dict(entry.labels),
            split=entry.split,
            source=self.name,
            meta=dict(entry.meta),
        )


HM_FILES = {"train": "train.jsonl", "dev": "dev_seen.jsonl", "test": "test_unseen.jsonl"}


def write_hateful_memes_layout(
    root: str | Path, count: int, image_size: int = 224, seed: int = 0, test_unseen_labels: bool = False
) -> Path:
    """SynthMemes in the real Hateful Memes layout (jsonl files, ``img/NNNNN.png``), for its reader.

    Lines mimic the real files: compact JSON, int ids, escaped slashes; ``text_length`` is an extra
    field a reader must ignore. The test file has no ``label`` unless ``test_unseen_labels``.
    """
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    source = SynthMemes(count=count, image_size=image_size, seed=seed, image_format="png")
    files = {split: (root / name).open("w", encoding="utf-8") for split, name in HM_FILES.items()}
    try:
        for entry in source.entries():
            img = f"img/{entry.ref:05d}.png"
            (root / img).write_bytes(source.load(entry).image)
            line = {"id": entry.ref, "img": img, "label": entry.labels["hateful"], "text": entry.text}
            if entry.split == "test" and not test_unseen_labels:
                del line["label"]
            line["text_length"] = len(entry.text)
            files[entry.split].write(json.dumps(line, separators=(",", ":")).replace("/", "\\/") + "\n")
    finally:
        for file in files.values():
            file.close()
    return root
