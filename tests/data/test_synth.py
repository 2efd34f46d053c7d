"""SynthMemes: determinism, the exact label balance of its block design, and the Hateful Memes layout."""

from __future__ import annotations

import io
import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from memetrain.data.images import open_verified, sniff_format
from memetrain.data.sources.synth import (
    CLASSES,
    COLOURS,
    CYCLE,
    PHRASES,
    SynthMemes,
    meme_factors,
    render_meme,
    write_hateful_memes_layout,
)


def _records(source: SynthMemes, n: int) -> list:
    return [source.load(entry) for entry in list(source.entries())[:n]]


def test_same_seed_same_bytes_other_seed_other_memes():
    first, again = _records(SynthMemes(count=8, seed=3), 8), _records(SynthMemes(count=8, seed=3), 8)
    assert [r.image for r in first] == [r.image for r in again]
    assert [r.text for r in first] == [r.text for r in again]
    other = _records(SynthMemes(count=8, seed=4), 8)
    assert all(a.image != b.image for a, b in zip(first, other))
    assert [r.text for r in first] != [r.text for r in other]


def test_prefix_is_stable_when_count_grows():
    small, large = SynthMemes(count=150), SynthMemes(count=300)
    assert list(small.entries()) == list(large.entries())[:150]
    assert _records(small, 5) == _records(large, 5)


def test_every_phrase_targets_one_class_that_the_text_never_names():
    targets = Counter(target for _, target in PHRASES)
    assert set(targets) == set(CLASSES) and min(targets.values()) >= 12
    assert len({phrase for phrase, _ in PHRASES}) == len(PHRASES)
    for lines, _ in PHRASES:
        assert not any(name.upper() in " ".join(lines) for name in CLASSES)


def test_labels_are_exactly_balanced_within_every_phrase_and_image_class():
    cycles = 2
    by_phrase, by_class, on_classes = defaultdict(Counter), defaultdict(Counter), defaultdict(set)
    entries = list(SynthMemes(count=cycles * CYCLE).entries())
    for entry in entries:
        factors = meme_factors(0, entry.ref)
        y = entry.labels["hateful"]
        assert y == int(entry.meta["image_class"] == entry.meta["target_class"])
        assert (factors.image_class, factors.target_class) == (
            entry.meta["image_class"],
            entry.meta["target_class"],
        )
        by_phrase[factors.punchline][y] += 1
        by_class[factors.image_class][y] += 1
        on_classes[factors.punchline].add(factors.image_class)
    assert set(by_phrase) == {phrase for phrase, _ in PHRASES}
    showings = cycles * 2 * (len(CLASSES) - 1)
    for phrase, counts in by_phrase.items():
        assert counts[0] == counts[1] == showings // 2, phrase  # both label values, 50/50
        assert on_classes[phrase] == set(CLASSES)  # harmful on its target, benign on every other class
    assert set(by_class) == set(CLASSES)
    for image_class, counts in by_class.items():
        assert counts[0] == counts[1] == cycles * CYCLE // len(CLASSES) // 2, image_class
    for start in range(0, len(entries), CYCLE):  # and within each single cycle
        assert sum(e.labels["hateful"] for e in entries[start : start + CYCLE]) == CYCLE // 2


def test_colour_and_count_are_independent_of_the_label():
    entries = list(SynthMemes(count=10 * CYCLE, seed=1).entries())
    rate = np.mean([e.labels["hateful"] for e in entries])
    for attribute in ("colour", "count"):
        groups = defaultdict(list)
        for entry in entries:
            groups[entry.meta[attribute]].append(entry.labels["hateful"])
        assert len(groups) >= 4
        for value, labels in groups.items():
            assert abs(np.mean(labels) - rate) < 0.08, (attribute, value)  # > 4 standard errors
    assert {e.meta["colour"] for e in entries} == set(COLOURS)


def test_text_is_the_drawn_caption_and_names_colour_and_count():
    source = SynthMemes(count=12, image_size=96)
    for entry in source.entries():
        record = source.load(entry)
        factors = meme_factors(0, entry.ref)
        assert record.text == entry.text == f"{factors.setup} {' '.join(factors.punchline)}"
        assert factors.setup == f"{factors.setup.split()[0]} {entry.meta['colour'].upper()} ONES"
        assert factors.setup.split()[0] in ("TWO", "THREE", "FOUR", "FIVE")
        assert (record.id, record.split, record.labels, record.source) == (
            entry.id,
            entry.split,
            entry.labels,
            "synth",
        )


def test_captions_are_white_on_black_at_top_and_bottom():
    pixels = np.asarray(render_meme(meme_factors(0, 0), 224)).astype(int)
    for band in (pixels[:30], pixels[-30:]):
        assert (band.min(axis=2) > 240).sum() > 100 and (band.max(axis=2) < 15).sum() > 100


@pytest.mark.parametrize(("size", "fmt"), [(32, "jpg"), (64, "png"), (224, "jpg"), (384, "png")])
def test_images_decode_at_the_requested_size(size: int, fmt: str):
    source = SynthMemes(count=3, image_size=size, image_format=fmt)
    for entry in source.entries():
        record = source.load(entry)
        assert record.image_format == fmt == sniff_format(record.image)
        image = open_verified(record.id, record.image)
        assert image.size == (size, size) and image.mode == "RGB"


def test_unlabeled_pool_has_distinct_ids_and_no_labels():
    source = SynthMemes(count=10, unlabeled=6)
    entries = list(source.entries())
    pool = [e for e in entries if e.split == "unlabeled"]
    assert len(pool) == 6 and all(e.labels == {} and e.id.startswith("synthu") for e in pool)
    assert len({e.id for e in entries}) == 16
    assert all(e.labels for e in entries if e.split != "unlabeled")
    record = source.load(pool[0])
    assert not record.is_labeled and record.text == pool[0].text
    assert record.image != source.load(entries[0]).image  # its own memes, not copies of the labeled ones


def test_splits_follow_the_fractions():
    splits = Counter(e.split for e in SynthMemes(count=4000).entries())
    assert set(splits) == {"train", "dev", "test"}
    assert abs(splits["train"] / 4000 - 0.8) < 0.03 and abs(splits["test"] / 4000 - 0.1) < 0.02
    assert {e.split for e in SynthMemes(count=50, splits={"all": 1.0}).entries()} == {"all"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"count": 0}, "count"),
        ({"image_size": 16}, "image_size"),
        ({"splits": {"train": 0.8, "dev": 0.1}}, "sum to"),
        ({"splits": {"train": 1.2, "dev": -0.2}}, r"\[0, 1\]"),
        ({"splits": {"train": 0.5, "unlabeled": 0.5}}, "unlabeled"),
        ({"image_format": "gif"}, "image_format"),
        ({"unlabeled": -1}, "unlabeled"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SynthMemes(**options)


@pytest.mark.parametrize("test_labels", [False, True])
def test_hateful_memes_layout_matches_the_real_files(tmp_path, test_labels: bool):
    root = write_hateful_memes_layout(
        tmp_path / "hm", count=40, image_size=48, seed=2, test_unseen_labels=test_labels
    )
    entries = list(SynthMemes(count=40, image_size=48, seed=2).entries())
    lines = {}
    for name in ("train.jsonl", "dev_seen.jsonl", "test_unseen.jsonl"):
        raw = (root / name).read_text(encoding="utf-8").splitlines()
        assert all('"img":"img\\/' in line and "/" not in line.replace("\\/", "") for line in raw)
        lines[name] = [json.loads(line) for line in raw]
    assert sum(map(len, lines.values())) == 40 and all(lines.values())
    by_id = {e.ref: e for e in entries}
    for name, rows in lines.items():
        for row in rows:
            assert isinstance(row["id"], int) and re.fullmatch(r"img/\d{5}\.png", row["img"])
            assert int(row["img"][4:9]) == row["id"]
            entry = by_id[row["id"]]
            assert row["text"] == entry.text and row["text_length"] == len(entry.text)
            has_label = name != "test_unseen.jsonl" or test_labels
            assert ("label" in row) == has_label
            if has_label:
                assert row["label"] == entry.labels["hateful"]
            image = Image.open(io.BytesIO((root / row["img"]).read_bytes()))
            assert image.format == "PNG" and image.size == (48, 48)


def test_hateful_memes_reader_reads_the_layout_back(tmp_path):
    from memetrain.data.sources.hateful_memes import HatefulMemes

    root = write_hateful_memes_layout(tmp_path / "hm", count=30, image_size=40, seed=5)
    synth = SynthMemes(count=30, image_size=40, seed=5, image_format="png", attributes=False)
    expected = {e.ref: e for e in synth.entries()}
    reader = HatefulMemes(str(root))
    entries = list(reader.entries())
    assert len(entries) == 30 and all(not isinstance(e, Exception) for e in entries)
    splits = {"train": "train", "dev_seen": "dev", "test_unseen": "test"}
    for entry in entries:
        original = expected[entry.meta["orig_id"]]
        assert entry.id == f"{original.ref:05d}" and entry.text == original.text
        assert splits[entry.split] == original.split
        assert entry.labels == ({} if entry.split == "test_unseen" else original.labels)
        assert entry.meta["text_length"] == len(original.text)
        record = reader.load(entry)
        assert record.image_format == "png" and record.image == synth.load(original).image
