"""SynthMemes: the procedurally generated meme corpus that is memetrain's embedded default dataset.

Each meme is a scene of ``count`` shapes of one class (circle, square, triangle, star) in one colour on
a textured background tinted by the class, with two captions drawn on it in meme style: the setup at
the top names the shapes' count and colour ("three red ones"), which both modalities show but which
carries no label, and the punchline at the bottom "targets" one shape class through an adjective
("keep the curvy ones out" targets circles). A meme is hateful exactly when its punchline is shown on
its target class, so neither the text nor the image alone predicts the label (the Hateful Memes
benign-confounder design). A block design makes the balance exact: in every cycle of ``CYCLE`` memes
each phrase is shown K-1 times on its target class and once on each other class, in a seeded order.
Everything is a pure function of (seed, pool, index), seeded through numpy's SeedSequence, so any
process renders the same meme and a longer corpus extends a shorter.

What keeps it learnable from scratch, and unimodal models at chance (each measured; see
tests/test_synth_learnability.py):

- The label is a pure interaction, so an encoder gets a useful gradient only once the other one
  separates the classes. The scene's tint (``SCENE_TINTS``: circles on rose, squares on green,
  triangles on blue, stars on pale) makes the image classes separable from the first step, where
  shapes alone left fusion at chance for 2500 CPU steps. The tints are equidistant in colour: with
  hues on a circle, the two far pairs split first and the near ones stayed confused.
- The punchline comes last in the text because the LSTM baseline reads its final state: with the
  target adjective first, fusion stayed at chance.
- Captions have one font size for the whole corpus (jittered per meme), fixed line breaks and
  adjectives of matched width across classes: with each phrase fitted to the width, an image-only
  ResNet read the target from the captions' outline (test AUROC 0.91).
- Shape colours and counts are independent of the class, so the setup never tells the class.

This is ``difficulty=easy``, where the studies' methods reach test AUROC 1.0 at 5 % of the labels;
``difficulty=hard`` (:mod:`memetrain.data.sources.synth_hard`) leaves every method headroom. Both
can pack each meme's generative factors as label columns of class ids (``attributes``), which no
method reads as input and evaluation probes (``eval.targets``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from memetrain.data.images import encode
from memetrain.data.records import HATEFUL_LABELS, IMAGE_FORMATS, Entry, MemeRecord
from memetrain.data.sources import synth_hard
from memetrain.data.sources.synth_render import (
    COLOURS,
    COUNT_WORDS,
    SCENE_TINTS,
    font_size,
    place_caption,
)
from memetrain.data.sources.synth_render import rng as random_stream
from memetrain.errors import ConfigError

CLASSES = ("circle", "square", "triangle", "star")
ADJECTIVES = {
    "circle": ("curvy", "bubbly", "rolling", "circular"),
    "square": ("squat", "blocky", "chunky", "angular"),
    "triangle": ("pointy", "jagged", "slanted", "tapering"),
    "star": ("shiny", "flashy", "sparkly", "glittery"),
}
"""The i-th adjective of every class has about the same drawn width, so a caption's outline (line
lengths) does not tell its target; an image model has to read the letters."""
TEMPLATES = (
    ("nobody wants", "the {} ones"),
    ("keep out", "the {} ones"),
    ("no room here", "for {} ones"),
    ("get rid of", "the {} ones"),
)
"""Punchlines (bottom captions) as two lines: the line break never depends on the adjective."""
PHRASES = tuple(
    (tuple(line.format(a).upper() for line in t), c)
    for c in CLASSES
    for a in ADJECTIVES[c]
    for t in TEMPLATES
)
"""(punchline lines, target class): 16 phrases per class."""

SCENE_GREY, SCENE_TINT, SCENE_JITTER = 150, 45, 15
"""Background base colour: grey + SCENE_TINT * direction, each channel jittered by +-SCENE_JITTER."""
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
    punchline: tuple[str, str]
    colour: str
    count: int

    @property
    def setup(self) -> str:
        """The top caption: the shapes' count and colour, which both modalities show."""
        return f"{COUNT_WORDS[self.count]} {self.colour.upper()} ONES"

    @property
    def text(self) -> str:
        """Exactly the words drawn on the image, in reading order: setup, then punchline."""
        return f"{self.setup} {' '.join(self.punchline)}"

    @property
    def hateful(self) -> int:
        return int(self.image_class == self.target_class)


@lru_cache(maxsize=64)
def _cycle_order(seed: int, pool: int, cycle: int) -> np.ndarray:
    return random_stream(seed, pool, _ORDER, cycle).permutation(CYCLE)


def meme_factors(seed: int, index: int, unlabeled: bool = False) -> MemeFactors:
    """The factors of meme ``index``; the unlabeled pool is a separate stream of the same generator."""
    pool = _POOLS["unlabeled" if unlabeled else "labeled"]
    slot = int(_cycle_order(seed, pool, index // CYCLE)[index % CYCLE])
    punchline, target = PHRASES[slot // SHOWINGS]
    showing = slot % SHOWINGS - (len(CLASSES) - 1)  # negative: on the target class
    image_class = target if showing < 0 else [c for c in CLASSES if c != target][showing]
    rng = random_stream(seed, pool, _ATTRIBUTES, index)  # never sees the label: colour and count stay neutral
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    count = int(rng.integers(min(COUNT_WORDS), max(COUNT_WORDS) + 1))
    return MemeFactors(seed, pool, index, image_class, target, punchline, colour, count)


@lru_cache(maxsize=8)
def caption_font_size(image_size: int) -> int:
    """The largest font size at which every caption line of the corpus fits the width.

    One size for all captions (before each meme's jitter), so the size never tells the phrase.
    """
    lines = [line for lines, _ in PHRASES for line in lines]
    lines += [f"{word} {colour.upper()} ONES" for word in COUNT_WORDS.values() for colour in COLOURS]
    return font_size(image_size, lines)


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
    """The meme as an RGB image: background tinted by the class, the shapes, then the captions on top."""
    s = image_size
    rng = random_stream(factors.seed, factors.pool, _LAYOUT, factors.index)
    tint = SCENE_GREY + SCENE_TINT * np.array(SCENE_TINTS[factors.image_class])
    base = tint + rng.uniform(-SCENE_JITTER, SCENE_JITTER, 3)  # muted, so the shapes stand out
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
    size = caption_font_size(s)
    place_caption(image, (factors.setup,), rng, top=True, base_size=size)
    place_caption(image, factors.punchline, rng, top=False, base_size=size)
    return image


DIFFICULTIES = ("easy", "hard")
ATTRIBUTES = ("image_class", "target_class", "template", "colour", "count")
"""Generative factors packed as label columns of class ids (``attributes=true``), for probes."""
HARD_ATTRIBUTES = ATTRIBUTES + ("hateful_clean", "confounder")
"""``hard`` adds two 0/1 columns: the label before its noise, and whether a meme is a twin confounder."""
_TEMPLATE_OF = {lines: i % len(TEMPLATES) for i, (lines, _) in enumerate(PHRASES)}


def attribute_classes(difficulty: str) -> dict[str, tuple[str, ...]]:
    """The class names of each class-id attribute column (id = position in the tuple)."""
    hard = difficulty == "hard"
    classes = synth_hard.CLASSES if hard else CLASSES
    templates = synth_hard.TEMPLATES if hard else TEMPLATES
    return {
        "image_class": classes,
        "target_class": classes,
        "template": tuple(first.replace(" ", "_") for first, _ in templates),
        "colour": tuple(COLOURS),
        "count": tuple(str(n) for n in COUNT_WORDS),
    }


class SynthMemes:
    """``source=synth``: ``count`` labeled memes split by seeded draws, plus ``unlabeled`` pool memes.

    ``difficulty``: ``easy`` (this module's corpus, where the studies' methods reach test AUROC 1.0)
    or ``hard`` (:mod:`memetrain.data.sources.synth_hard`: headroom for every method). With
    ``attributes`` the labeled memes also carry their generative factors as label columns
    (:data:`ATTRIBUTES`, class ids named by ``label_classes``; ``hard`` adds :data:`HARD_ATTRIBUTES`'
    0/1 columns), which no method reads as input and evaluation can probe (``eval.targets``).
    """

    name = "synth"
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
        difficulty: str = "easy",
        attributes: bool = True,
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
        if difficulty not in DIFFICULTIES:
            raise ConfigError(f"synth difficulty is {difficulty!r}; use one of {', '.join(DIFFICULTIES)}")
        self.count, self.image_size, self.seed, self.unlabeled = count, image_size, seed, unlabeled
        self.splits, self.image_format, self.jpeg_quality = splits, image_format, jpeg_quality
        self.difficulty, self.attributes = difficulty, bool(attributes)
        self._names, self._bounds = list(splits), np.cumsum(list(splits.values()))
        columns = HARD_ATTRIBUTES if difficulty == "hard" else ATTRIBUTES
        self.label_names = HATEFUL_LABELS + (columns if attributes else ())
        self.label_classes = attribute_classes(difficulty) if attributes else {}

    def split_of(self, index: int) -> str:
        """One seeded draw per index, so splits do not change when ``count`` grows."""
        u = random_stream(self.seed, _POOLS["labeled"], _SPLIT, index).random()
        return self._names[min(int(np.searchsorted(self._bounds, u, side="right")), len(self._names) - 1)]

    def factors(self, index: int, unlabeled: bool = False) -> MemeFactors | synth_hard.HardFactors:
        if self.difficulty == "hard":
            return synth_hard.hard_factors(self.seed, index, _POOLS["unlabeled" if unlabeled else "labeled"])
        return meme_factors(self.seed, index, unlabeled)

    def labels(self, f: MemeFactors | synth_hard.HardFactors) -> dict[str, int]:
        """The ``hateful`` label and, with ``attributes``, every attribute column's value."""
        labels = {"hateful": f.hateful}
        if not self.attributes:
            return labels
        classes = self.label_classes
        template = f.template if self.difficulty == "hard" else _TEMPLATE_OF[f.punchline]
        labels |= {
            "image_class": classes["image_class"].index(f.image_class),
            "target_class": classes["target_class"].index(f.target_class),
            "template": template,
            "colour": classes["colour"].index(f.colour),
            "count": classes["count"].index(str(f.count)),
        }
        if self.difficulty == "hard":
            labels |= {"hateful_clean": f.hateful_clean, "confounder": f.confounder}
        return labels

    def entries(self) -> Iterator[Entry]:
        for unlabeled, n in ((False, self.count), (True, self.unlabeled)):
            for index in range(n):
                f = self.factors(index, unlabeled)
                meta = {
                    "image_class": f.image_class,
                    "target_class": f.target_class,
                    "colour": f.colour,
                    "count": f.count,
                }
                if self.difficulty == "hard":
                    meta |= {"template": f.template, "label_flipped": f.flipped}
                yield Entry(
                    id=f"synthu{index:07d}" if unlabeled else f"synth{index:07d}",
                    split="unlabeled" if unlabeled else self.split_of(index),
                    ref=index,
                    text=f.text,
                    labels={} if unlabeled else self.labels(f),
                    meta=meta,
                )

    def load(self, entry: Entry) -> MemeRecord:
        factors = self.factors(entry.ref, entry.split == "unlabeled")
        if self.difficulty == "hard":
            image = synth_hard.render_hard(factors, self.image_size)
        else:
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
    source = SynthMemes(count=count, image_size=image_size, seed=seed, image_format="png", attributes=False)
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
