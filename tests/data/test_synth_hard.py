"""SynthMemes at difficulty=hard: its block design, label noise, confounders and attribute columns."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import ImageFont

from memetrain.data.sources import synth_hard
from memetrain.data.sources.synth import ATTRIBUTES, HARD_ATTRIBUTES, SynthMemes, attribute_classes
from memetrain.data.sources.synth_render import COLOURS, COUNT_WORDS

CYCLES = 2


@pytest.fixture(scope="module")
def hard_entries():
    return list(SynthMemes(count=CYCLES * synth_hard.CYCLE, difficulty="hard").entries())


def test_clean_labels_are_balanced_within_every_phrase_image_class_and_cycle(hard_entries):
    by_class, on_classes = defaultdict(Counter), defaultdict(set)
    for entry in hard_entries:
        f = synth_hard.hard_factors(0, entry.ref, 0)
        clean = entry.labels["hateful_clean"]
        assert clean == int(f.image_class == f.target_class)
        by_class[f.image_class][clean] += 1
        on_classes[f.target_class].add(f.image_class)
    for image_class, counts in by_class.items():
        assert counts[0] == counts[1] == CYCLES * synth_hard.CYCLE // len(synth_hard.CLASSES) // 2, (
            image_class
        )
    for target, seen in on_classes.items():
        assert seen == set(synth_hard.CLASSES), target  # every caption target is shown on every class
    for start in range(0, len(hard_entries), synth_hard.CYCLE):
        cycle = hard_entries[start : start + synth_hard.CYCLE]
        assert sum(e.labels["hateful_clean"] for e in cycle) == synth_hard.CYCLE // 2


def test_each_phrase_is_half_hateful_a_quarter_twin_confounders_a_quarter_other_pairs():
    for phrase in range(len(synth_hard.PHRASES)):
        target = synth_hard.PHRASES[phrase][1]
        shown = Counter(synth_hard.showing_class(phrase, k) for k in range(synth_hard.SHOWINGS))
        assert shown[target] == 6 and shown[synth_hard.TWIN[target]] == 3
        assert sum(shown.values()) == 12 and len(shown) == 5  # 3 more classes, once each
    # the twin pairs share a background tint; the pairs' tints differ
    pairs = [synth_hard.CLASSES[i : i + 2] for i in range(0, 8, 2)]
    assert all(synth_hard.PAIR_TINTS[a] == synth_hard.PAIR_TINTS[b] for a, b in pairs)
    assert len({synth_hard.PAIR_TINTS[a] for a, _ in pairs}) == 4


def test_label_noise_flips_about_five_percent_independently_of_the_clean_label(hard_entries):
    flipped = np.array([e.meta["label_flipped"] for e in hard_entries])
    clean = np.array([e.labels["hateful_clean"] for e in hard_entries])
    noisy = np.array([e.labels["hateful"] for e in hard_entries])
    assert (noisy == clean ^ flipped).all()
    n = len(flipped)
    sd = np.sqrt(synth_hard.LABEL_NOISE * (1 - synth_hard.LABEL_NOISE) / n)
    assert abs(flipped.mean() - synth_hard.LABEL_NOISE) < 4 * sd
    assert abs(flipped[clean == 1].mean() - flipped[clean == 0].mean()) < 8 * sd


def test_confounder_column_marks_the_benign_memes_on_the_targets_twin(hard_entries):
    for entry in hard_entries[:500]:
        twin = synth_hard.TWIN[entry.meta["target_class"]] == entry.meta["image_class"]
        assert entry.labels["confounder"] == int(twin)
    share = np.mean([e.labels["confounder"] for e in hard_entries])
    assert share == pytest.approx(3 / 12)


def test_colour_count_and_template_say_nothing_of_the_label(hard_entries):
    rate = np.mean([e.labels["hateful_clean"] for e in hard_entries])
    for column in ("colour", "count", "template"):
        groups = defaultdict(list)
        for entry in hard_entries:
            groups[entry.labels[column]].append(entry.labels["hateful_clean"])
        assert len(groups) == len(attribute_classes("hard")[column])
        for value, labels in groups.items():
            assert abs(np.mean(labels) - rate) < 4 * np.sqrt(0.25 / len(labels)), (column, value)


def test_text_never_names_a_class_and_adjectives_of_a_slot_have_one_width():
    font = ImageFont.load_default(size=40)
    for slot in range(4):
        widths = [font.getlength(synth_hard.ADJECTIVES[c][slot].upper()) for c in synth_hard.CLASSES]
        assert max(widths) / min(widths) < 1.12, (slot, widths)
    for lines, _, _ in synth_hard.PHRASES:
        assert not any(name.upper() in " ".join(lines) for name in synth_hard.CLASSES)


def test_attribute_columns_hold_class_ids_that_name_the_factors(hard_entries):
    classes = attribute_classes("hard")
    source = SynthMemes(count=20, difficulty="hard")
    assert source.label_names == ("hateful", *HARD_ATTRIBUTES)
    assert source.label_classes == classes
    for entry in hard_entries[:200]:
        assert classes["image_class"][entry.labels["image_class"]] == entry.meta["image_class"]
        assert classes["target_class"][entry.labels["target_class"]] == entry.meta["target_class"]
        assert classes["colour"][entry.labels["colour"]] == entry.meta["colour"]
        assert classes["count"][entry.labels["count"]] == str(entry.meta["count"])
        assert entry.labels["template"] == entry.meta["template"]
    easy = SynthMemes(count=5)
    assert easy.label_names == ("hateful", *ATTRIBUTES) and len(easy.label_classes["image_class"]) == 4
    bare = SynthMemes(count=5, difficulty="hard", attributes=False)
    assert bare.label_names == ("hateful",) and bare.label_classes == {}
    assert all(set(e.labels) == {"hateful"} for e in bare.entries())


def test_hard_memes_are_deterministic_extend_with_count_and_differ_from_easy():
    small, large = (
        SynthMemes(count=30, difficulty="hard", image_size=48),
        SynthMemes(count=60, difficulty="hard", image_size=48),
    )
    assert list(small.entries()) == list(large.entries())[:30]
    first = [small.load(e) for e in list(small.entries())[:4]]
    assert first == [large.load(e) for e in list(large.entries())[:4]]
    easy = SynthMemes(count=4, image_size=48)
    assert all(a.image != b.image for a, b in zip(first, (easy.load(e) for e in easy.entries())))


def test_captions_are_noisy_but_drawn_as_written():
    texts = [synth_hard.hard_factors(0, i, 0).text for i in range(600)]
    words = {word for text in texts for word in text.split()}
    vocabulary = {w.upper() for _, t in synth_hard.TEMPLATES for line in t for w in line.split()}
    vocabulary |= {a.upper() for adjectives in synth_hard.ADJECTIVES.values() for a in adjectives}
    vocabulary |= (
        {c.upper() for c in COLOURS} | set(COUNT_WORDS.values()) | {"THESE", "ONES", *synth_hard.FILLERS}
    )
    typos = [w for w in words if w.isalpha() and w not in vocabulary and len(w) > 3]
    assert typos, "some words carry typos"
    assert any(text.split()[0] in synth_hard.FILLERS for text in texts)
    assert len({text.split()[0] for text in texts}) > 5  # setups are paraphrased


def test_unknown_difficulty_is_refused():
    with pytest.raises(ValueError, match="difficulty"):
        SynthMemes(difficulty="medium")
