"""SynthMemes at ``difficulty=hard``: a corpus on which no method is perfect, so methods separate.

The label is the same interaction as at ``easy`` (a meme is hateful exactly when its punchline's
target class is the class of the shapes drawn), made harder on every axis at once:

- **8 image classes in 4 twin pairs** that differ only in a detail: circle / ring (a hole), square /
  diamond (a 45 degree turn), triangle / wedge (pointing up or down), star / cross. The background
  tint (``PAIR_TINTS``) tells the *pair*, never the class within it.
- **Confounders that need the detail**: per cycle each phrase is shown 6 times on its target class
  (hateful), 3 times on its twin (benign: the caption "fits" the pair) and 3 times on other pairs'
  classes (benign). A model that reads the pair but not the detail scores the twins as hateful.
- **Smaller shapes in clutter**: 2-5 shapes of radius 5.5-9 % of the side, among 2-4 smaller
  distractor shapes of other classes in other colours and random strokes.
- **Paraphrased, noisy captions**: 8 punchline templates x 4 width-matched adjectives per class
  (256 phrases), 3 setup forms, filler words and letter-level typos (swaps, drops, doubles).
- **Label noise**: ``LABEL_NOISE`` of the ``hateful`` labels are flipped (seeded per meme), so
  test AUROC is at most about 1 - ``LABEL_NOISE``; ``hateful_clean`` holds the label before it.

Closed shortcuts, as at ``easy``: every phrase and every image class is hateful on exactly half of
its showings in every cycle (text alone, image class alone: chance); the tint tells the pair (half
hateful too); adjectives of one slot have the same drawn width across classes, and caption size,
fillers and typos never depend on the class, so a caption's outline does not tell its target.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from memetrain.data.sources.synth_render import (
    COLOURS,
    COUNT_WORDS,
    SCENE_TINTS,
    font_size,
    place_caption,
    rng,
)

CLASSES = ("circle", "ring", "square", "diamond", "triangle", "wedge", "star", "cross")
"""Image classes, twins side by side: class ``2k`` and ``2k + 1`` are a pair."""
TWIN = {c: CLASSES[i ^ 1] for i, c in enumerate(CLASSES)}
ADJECTIVES = {
    "circle": ("plump", "round", "bubbly", "rolling"),
    "ring": ("holey", "donut", "banded", "hollow"),
    "square": ("squat", "boxed", "blocky", "upright"),
    "diamond": ("askew", "tilted", "angled", "leaning"),
    "triangle": ("spired", "pointy", "tented", "arrowy"),
    "wedge": ("saggy", "dipped", "sunken", "sloping"),
    "star": ("blingy", "glowy", "flashy", "radiant"),
    "cross": ("hashy", "armed", "stubby", "gridded"),
}
"""The i-th adjective of every class has about the same drawn width (within 5 %)."""
TEMPLATES = (
    ("nobody wants", "the {} ones"),
    ("keep out", "the {} ones"),
    ("no room here", "for {} ones"),
    ("get rid of", "the {} ones"),
    ("we dont need", "any {} ones"),
    ("send away", "those {} ones"),
    ("not welcome", "you {} ones"),
    ("stay away", "from {} ones"),
)
PHRASES = tuple(
    (tuple(line.format(a).upper() for line in t), c, k)
    for c in CLASSES
    for a in ADJECTIVES[c]
    for k, t in enumerate(TEMPLATES)
)
"""(punchline lines, target class, template): 32 phrases per class, class-major."""
SETUPS = ("{count} {colour} ONES", "THESE {count} {colour}", "{colour} ONES X{digits}")
FILLERS = ("LOL", "OK", "SMH", "ME:")
FILLER_RATE, TYPO_RATE = 0.3, 0.06
"""Share of setups with a filler word before them; chance of a typo in each word of 4+ letters."""
PAIR_TINTS = {c: tuple(SCENE_TINTS.values())[i // 2] for i, c in enumerate(CLASSES)}
"""A pair's background tint (the easy corpus's four equidistant ones): tells the pair, not the class."""
ON_TARGET, ON_TWIN, ON_OTHER = 6, 3, 3
SHOWINGS = ON_TARGET + ON_TWIN + ON_OTHER
"""Memes per phrase per cycle: hateful on the target class, benign on its twin, benign elsewhere."""
CYCLE = len(PHRASES) * SHOWINGS
LABEL_NOISE = 0.05
"""Share of ``hateful`` labels flipped (each meme's own seeded draw)."""
SUBJECT_RADIUS, DISTRACTOR_RADIUS = (0.055, 0.09), (0.03, 0.045)
"""Shape radii as shares of the image side."""

_ORDER, _ATTRIBUTES, _LAYOUT, _NOISE = 10, 11, 12, 13  # random streams apart from the easy corpus's
_PER_CLASS = len(PHRASES) // len(CLASSES)


@dataclass(frozen=True)
class HardFactors:
    """Everything that defines one hard meme; :func:`render_hard` draws it."""

    seed: int
    pool: int
    index: int
    image_class: str
    target_class: str
    template: int
    setup: str
    punchline: tuple[str, str]
    colour: str
    count: int
    flipped: bool

    @property
    def text(self) -> str:
        """Exactly the words drawn on the image, in reading order: setup, then punchline."""
        return f"{self.setup} {' '.join(self.punchline)}"

    @property
    def hateful_clean(self) -> int:
        return int(self.image_class == self.target_class)

    @property
    def hateful(self) -> int:
        """The label as packed: the clean one, flipped for ``LABEL_NOISE`` of the memes."""
        return self.hateful_clean ^ int(self.flipped)

    @property
    def confounder(self) -> int:
        """1 for a benign meme on the target's twin: only the shapes' detail tells it from a hateful one."""
        return int(self.image_class == TWIN[self.target_class])


@lru_cache(maxsize=64)
def _cycle_order(seed: int, pool: int, cycle: int) -> np.ndarray:
    return rng(seed, pool, _ORDER, cycle).permutation(CYCLE)


def showing_class(phrase: int, showing: int) -> str:
    """The image class of one showing of a phrase: its target, its twin, or one of the 6 classes of
    other pairs, rotated by the phrase's rank in its class so every class gets the same count."""
    target = PHRASES[phrase][1]
    if showing < ON_TARGET:
        return target
    if showing < ON_TARGET + ON_TWIN:
        return TWIN[target]
    others = [c for c in CLASSES if c not in (target, TWIN[target])]
    rank = phrase % _PER_CLASS
    return others[(ON_OTHER * rank + showing - ON_TARGET - ON_TWIN) % len(others)]


def hard_factors(seed: int, index: int, pool: int) -> HardFactors:
    slot = int(_cycle_order(seed, pool, index // CYCLE)[index % CYCLE])
    phrase = slot // SHOWINGS
    lines, target, template = PHRASES[phrase]
    image_class = showing_class(phrase, slot % SHOWINGS)
    r = rng(seed, pool, _ATTRIBUTES, index)  # never sees the label: colour, count, wording stay neutral
    colour = list(COLOURS)[r.integers(len(COLOURS))]
    count = int(r.integers(min(COUNT_WORDS), max(COUNT_WORDS) + 1))
    form = SETUPS[r.integers(len(SETUPS))]
    setup = form.format(count=COUNT_WORDS[count], colour=colour.upper(), digits=count)
    if r.random() < FILLER_RATE:
        setup = f"{FILLERS[r.integers(len(FILLERS))]} {setup}"
    setup = _typos(setup, r)
    punchline = (_typos(lines[0], r), _typos(lines[1], r))
    flipped = bool(rng(seed, pool, _NOISE, index).random() < LABEL_NOISE)
    return HardFactors(
        seed, pool, index, image_class, target, template, setup, punchline, colour, count, flipped
    )


def _typos(line: str, r: np.random.Generator) -> str:
    """Each word of 4+ letters gets, with ``TYPO_RATE``, one typo: two inner letters swapped, a letter
    dropped or one doubled (one draw per word whatever happens, so the stream stays aligned)."""
    words = []
    for word in line.split(" "):
        u, kind, at = r.random(), int(r.integers(3)), int(r.integers(1, max(2, len(word) - 1)))
        if u < TYPO_RATE and len(word) >= 4 and word.isalpha():
            if kind == 0:
                word = word[:at] + word[at + 1] + word[at] + word[at + 2 :]
            elif kind == 1:
                word = word[:at] + word[at + 1 :]
            else:
                word = word[:at] + word[at] + word[at:]
        words.append(word)
    return " ".join(words)


@lru_cache(maxsize=8)
def hard_font_size(image_size: int) -> int:
    """One caption size for the whole corpus (before each meme's jitter), so it never tells the phrase."""
    lines = [line for lines, _, _ in PHRASES for line in lines]
    longest_setup = max(
        (form.format(count=word, colour=colour.upper(), digits=n) for form in SETUPS
         for n, word in COUNT_WORDS.items() for colour in COLOURS),
        key=len,
    )  # fmt: skip
    lines.append(f"SMH {longest_setup}")
    return font_size(image_size, lines)


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, r: float, angle: float, fill
) -> None:
    """One shape of class ``kind`` centred at (x, y), radius ``r``, turned by ``angle`` (small)."""
    outline, line = tuple(c // 3 for c in fill), max(1, round(r / 6))
    box = (x - r, y - r, x + r, y + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=line)
        return
    if kind == "ring":  # the hole shows the background
        draw.ellipse(box, outline=fill, width=max(1, round(0.5 * r)))
        draw.ellipse(box, outline=outline, width=line)
        h = 0.5 * r
        draw.ellipse((x - h, y - h, x + h, y + h), outline=outline, width=line)
        return
    if kind == "cross":  # a plus sign, arms 0.76 r wide
        a, h = 1.25 * r, 0.38 * r
        base = [
            (-h, -a),
            (h, -a),
            (h, -h),
            (a, -h),
            (a, h),
            (h, h),
            (h, a),
            (-h, a),
            (-h, h),
            (-a, h),
            (-a, -h),
            (-h, -h),
        ]
        draw.polygon([_turn(u, v, angle, x, y) for u, v in base], fill=fill, outline=outline, width=line)
        return
    radii, start = {
        "square": ([1.2 * r] * 4, np.pi / 4),
        "diamond": ([1.3 * r] * 4, 0.0),
        "triangle": ([1.3 * r] * 3, -np.pi / 2),
        "wedge": ([1.3 * r] * 3, np.pi / 2),
        "star": ([1.3 * r, 0.55 * r] * 5, -np.pi / 2),
    }[kind]
    angles = start + angle + 2 * np.pi * np.arange(len(radii)) / len(radii)
    points = [(x + rad * np.cos(a), y + rad * np.sin(a)) for rad, a in zip(radii, angles)]
    draw.polygon(points, fill=fill, outline=outline, width=line)


def _turn(u: float, v: float, angle: float, x: float, y: float) -> tuple[float, float]:
    c, s = np.cos(angle), np.sin(angle)
    return x + u * c - v * s, y + u * s + v * c


def render_hard(factors: HardFactors, image_size: int = 224) -> Image.Image:
    """The meme as an RGB image: pair-tinted background with strokes, distractors, shapes, captions."""
    s = image_size
    r = rng(factors.seed, factors.pool, _LAYOUT, factors.index)
    tint = 150 + 45 * np.array(PAIR_TINTS[factors.image_class])
    base = tint + r.uniform(-15, 15, 3)
    light = r.normal(0, 25, (4, 4, 1)) + np.linspace(-20, 20, 4)[:, None, None]
    noise = base + light + r.normal(0, 12, (4, 4, 3))
    image = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).resize((s, s), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(r.integers(4, 9))):  # clutter strokes
        x0, y0, x1, y1 = r.uniform(0, s, 4)
        stroke = tuple(int(c) for c in r.integers(40, 220, 3))
        draw.line((x0, y0, x1, y1), fill=stroke, width=max(1, round(s * r.uniform(0.004, 0.012))))
    placed: list[tuple[float, float, float]] = []
    others = [c for c in CLASSES if c != factors.image_class]
    palette = [c for c in COLOURS if c != factors.colour]
    shapes = [(factors.image_class, factors.colour, SUBJECT_RADIUS)] * factors.count
    shapes += [
        (others[r.integers(len(others))], palette[r.integers(len(palette))], DISTRACTOR_RADIUS)
        for _ in range(int(r.integers(2, 5)))
    ]
    for kind, colour, (low, high) in shapes:
        for _attempt in range(30):  # avoid overlaps so the count stays visible, give up if crowded
            radius = s * r.uniform(low, high)
            x, y = r.uniform(radius * 1.3, s - radius * 1.3), r.uniform(0.27 * s, 0.73 * s)
            if all(np.hypot(x - px, y - py) > 1.3 * (radius + pr) for px, py, pr in placed):
                break
        placed.append((x, y, radius))
        fill = tuple(int(c) for c in np.add(COLOURS[colour], r.integers(-20, 21, 3)).clip(0, 255))
        draw_shape(draw, kind, x, y, radius, r.uniform(-0.15, 0.15), fill)
    size = hard_font_size(s)
    place_caption(image, (factors.setup,), r, top=True, base_size=size)
    place_caption(image, factors.punchline, r, top=False, base_size=size)
    return image
