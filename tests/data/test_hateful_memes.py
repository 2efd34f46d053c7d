"""HatefulMemes reads the real jsonl layout and turns every bad line or image into a located Rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from memetrain.data.records import Entry, Rejected
from memetrain.data.sources.hateful_memes import HatefulMemes

# Lines as the released files have them: escaped slashes, int ids, zero-padded image names.
TRAIN = [
    rb'{"id":42953,"img":"img\/42953.png","label":0,"text":"its their character not their color that matters"}',
    b'{"id":1235,"img":"img\\/01235.png","label":1,"text":"don\'t be afraid to love again everyone is not like your ex"}',
]
DEV_SEEN = [
    rb'{"id":8291,"img":"img\/08291.png","label":1,"text":"white people is this a shooting range","text_length":37}'
]
TEST_UNSEEN = [
    rb'{"id":16395,"img":"img\/16395.png","text":"handjobs sold seperately"}',
    rb'{"id":37405,"img":"img\/37405.png","text":"introducing fidget spinner for women"}',
]


def write_image(path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), (200, 30, 30)).save(path, format=fmt)


def write_jsonl(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def make_dataset(root: Path, **files: list[bytes]) -> Path:
    for name in ("42953", "01235", "08291", "16395", "37405"):
        write_image(root / "img" / f"{name}.png")
    for stem, lines in (files or {"train": TRAIN, "dev_seen": DEV_SEEN, "test_unseen": TEST_UNSEEN}).items():
        write_jsonl(root / f"{stem}.jsonl", lines)
    return root


def split_outcomes(items: list[Entry | Rejected]) -> tuple[list[str], dict[str, str]]:
    entries = [item.id for item in items if isinstance(item, Entry)]
    return entries, {item.id: item.reason for item in items if isinstance(item, Rejected)}


def test_reads_every_split_file_in_the_real_format(tmp_path):
    source = HatefulMemes(str(make_dataset(tmp_path)))
    entries = list(source.entries())

    assert [(e.split, e.id) for e in entries] == [
        ("train", "42953"),
        ("train", "01235"),
        ("dev_seen", "08291"),
        ("test_unseen", "16395"),
        ("test_unseen", "37405"),
    ]
    padded = entries[1]
    assert padded.ref == tmp_path / "img" / "01235.png"
    assert padded.labels == {"hateful": 1}
    assert padded.text == "don't be afraid to love again everyone is not like your ex"
    assert padded.meta == {"orig_id": 1235}
    assert entries[2].meta == {"orig_id": 8291, "text_length": 37}
    assert entries[3].labels == {} and entries[4].labels == {}
    assert (source.name, source.label_names, source.main_label) == ("hateful_memes", ("hateful",), "hateful")


def test_load_reads_the_image_bytes(tmp_path):
    source = HatefulMemes(str(make_dataset(tmp_path)))
    entry = next(iter(source.entries()))
    record = source.load(entry)

    assert record.image == (tmp_path / "img" / "42953.png").read_bytes()
    assert record.image_format == "png"
    assert (record.id, record.split, record.source) == ("42953", "train", "hateful_memes")
    assert record.text == "its their character not their color that matters"
    assert record.labels == {"hateful": 0} and record.meta == {"orig_id": 42953}


def test_named_splits_only(tmp_path):
    source = HatefulMemes(str(make_dataset(tmp_path)), splits=["test_unseen"])
    assert [e.id for e in source.entries()] == ["16395", "37405"]


def test_a_first_release_split_can_be_named(tmp_path):
    make_dataset(tmp_path, dev=DEV_SEEN)
    assert [e.split for e in HatefulMemes(str(tmp_path), splits=["dev"]).entries()] == ["dev"]


def test_missing_split_file_names_it_and_lists_the_others(tmp_path):
    with pytest.raises(
        ValueError, match=r"test_seen\.jsonl.*found train\.jsonl, dev_seen\.jsonl, test_unseen"
    ):
        HatefulMemes(str(make_dataset(tmp_path)), splits=["train", "test_seen"])


def test_missing_input_dir_and_no_annotation_file(tmp_path):
    with pytest.raises(ValueError, match="nowhere does not exist"):
        HatefulMemes(str(tmp_path / "nowhere"))
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match=r"no Hateful Memes annotation file in .*: expected train\.jsonl"):
        HatefulMemes(str(tmp_path))


def test_ids_that_are_not_the_image_number_are_kept(tmp_path):
    lines = [
        rb'{"id":77,"img":"img\/meme_a.png","label":0,"text":"a"}',
        rb'{"id":"x-1","img":"img\/00001.png","label":null,"text":"b"}',
    ]
    entries = list(HatefulMemes(str(make_dataset(tmp_path, train=lines))).entries())
    assert [(e.id, e.meta["orig_id"], e.labels) for e in entries] == [
        ("77", 77, {"hateful": 0}),
        ("x-1", "x-1", {}),
    ]


def test_bad_lines_are_rejected_by_line_and_the_rest_loads(tmp_path):
    lines = [
        TRAIN[0],
        b'{"id":11111,"img":"img/11111.png","label":0,"text":"caf\xe9 latte"}',  # Latin-1, id readable
        b"\xff\xfe{not json",
        b"",
        b'{"id":22222,"img":"img/22222.png","label":0,"text":"unclosed"',
        b"[1, 2]",
        b'{"img":"img/33333.png","label":0,"text":"no id"}',
        b'{"id":44444,"label":0,"text":"no img"}',
        b'{"id":55555,"img":"img/55555.png","label":2,"text":"two"}',
        b'{"id":66666,"img":"img/66666.png","label":"yes","text":"yes"}',
        b'{"id":77777,"img":"img/77777.png","label":true,"text":"bool"}',
        b'{"id":88888,"img":"../outside/88888.png","label":0,"text":"escape"}',
        b'{"id":99999,"img":"/etc/99999.png","label":0,"text":"absolute"}',
        b'{"id":12345,"img":"img/12345.png","label":0,"text":null}',  # text is the packer's to check
        b'{"id":1.5,"img":"img/00015.png","label":0,"text":"float id"}',
        TRAIN[1],
    ]
    items = list(HatefulMemes(str(make_dataset(tmp_path, train=lines))).entries())
    entries, rejected = split_outcomes(items)

    assert entries == ["42953", "12345", "01235"]
    assert list(rejected) == [
        "11111",
        "line 3 of train.jsonl",
        "line 5 of train.jsonl",
        "line 6 of train.jsonl",
        "line 7 of train.jsonl",
        "44444",
        "55555",
        "66666",
        "77777",
        "88888",
        "99999",
        "line 15 of train.jsonl",
    ]
    assert rejected["11111"].startswith("line 2 of train.jsonl: the line is not valid UTF-8 (byte 0xe9")
    assert "not valid UTF-8 (byte 0xff at offset 0)" in rejected["line 3 of train.jsonl"]
    assert "not valid JSON" in rejected["line 5 of train.jsonl"]
    assert rejected["line 6 of train.jsonl"] == "line 6 of train.jsonl: a JSON list, expected an object"
    assert rejected["line 7 of train.jsonl"] == "line 7 of train.jsonl: no 'id' field"
    assert rejected["44444"] == "line 8 of train.jsonl: no 'img' field"
    assert rejected["55555"] == "line 9 of train.jsonl: label 'hateful' is 2; expected 0 or 1"
    assert rejected["66666"] == "line 10 of train.jsonl: label 'hateful' is 'yes'; expected 0 or 1"
    assert "line 11 of train.jsonl: label 'hateful' is True (a boolean)" in rejected["77777"]
    assert "'../outside/88888.png' leaves the dataset folder" in rejected["88888"]
    assert "'/etc/99999.png' leaves the dataset folder" in rejected["99999"]
    assert rejected["line 15 of train.jsonl"].endswith(": 'id' is 1.5; expected an integer or a string")
    assert all(item.split == "train" for item in items)


def test_unreadable_images_are_rejected_at_load(tmp_path):
    lines = [
        rb'{"id":1,"img":"img\/00001.png","label":0,"text":"missing"}',
        rb'{"id":2,"img":"img\/00002.png","label":0,"text":"empty"}',
        rb'{"id":3,"img":"img\/00003.png","label":0,"text":"not an image"}',
        rb'{"id":42953,"img":"img\/42953.png","label":0,"text":"fine"}',
    ]
    source = HatefulMemes(str(make_dataset(tmp_path, train=lines)))
    (tmp_path / "img" / "00002.png").write_bytes(b"")
    (tmp_path / "img" / "00003.png").write_text("<html>not found</html>")
    reasons = {}
    for entry in source.entries():
        try:
            assert source.load(entry).id == "42953"
        except Rejected as rejected:
            assert rejected.split == "train"
            reasons[rejected.id] = rejected.reason

    assert reasons == {
        "00001": "image file img/00001.png not found",
        "00002": "image file img/00002.png is empty (0 bytes)",
        "00003": "image file img/00003.png is not a JPEG, PNG, GIF, BMP or WebP image",
    }
