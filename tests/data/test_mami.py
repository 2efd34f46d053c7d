"""Mami reads the SemEval-2022 Task 5 tsv layout, with test labels from the separate gold file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from memetrain.data.records import Entry, Rejected
from memetrain.data.sources.mami import Mami

HEADER = "file_name\tmisogynous\tshaming\tstereotype\tobjectification\tviolence\tText Transcription"
TRAINING = [
    HEADER,
    "1.jpg\t0\t0\t0\t0\t0\tMilk Milk.zip",
    '15236.jpg\t1\t1\t0\t0\t0\t"Ça c\'est la “vie” 😂"',
    '10001.jpg\t1\t0\t1\t1\t0\t"When your ""friend"" says\tshe can cook"',
]
TEST = ["file_name\tText Transcription", "15000.jpg\tno label row for me", '15001.jpg\t"Ünïcödé, quoted"']
TEST_LABELS = ["15001.jpg\t1\t0\t0\t1\t0", "99999.jpg\t0\t0\t0\t0\t0"]


def write_image(path: Path) -> None:
    Image.new("RGB", (5, 7), (10, 120, 240)).save(path, format="JPEG")


def write_lines(path: Path, lines: list[str | bytes]) -> None:
    raw = [line if isinstance(line, bytes) else line.encode("utf-8") for line in lines]
    path.write_bytes(b"\r\n".join(raw) + b"\r\n")


def make_dataset(root: Path, training: list | None = TRAINING, test: list | None = TEST) -> Path:
    root.mkdir(exist_ok=True)
    for stem in ("1", "15236", "10001", "15000", "15001"):
        write_image(root / f"{stem}.jpg")
    if training is not None:
        write_lines(root / "training.csv", training)
    if test is not None:
        write_lines(root / "Test.csv", test)
    write_lines(root / "test_labels.txt", TEST_LABELS)
    return root


def test_reads_training_csv(tmp_path):
    source = Mami(str(make_dataset(tmp_path, test=None)))
    entries = list(source.entries())

    assert [(e.split, e.id) for e in entries] == [("train", "1"), ("train", "15236"), ("train", "10001")]
    assert entries[1].text == "Ça c'est la “vie” 😂"
    assert entries[2].text == 'When your "friend" says\tshe can cook'
    assert entries[1].labels == {
        "misogynous": 1,
        "shaming": 1,
        "stereotype": 0,
        "objectification": 0,
        "violence": 0,
    }
    assert entries[1].meta == {"file_name": "15236.jpg"}
    assert entries[1].ref == tmp_path / "15236.jpg"
    assert (source.name, source.main_label, source.label_names[0]) == ("mami", "misogynous", "misogynous")


def test_load_reads_the_jpeg(tmp_path):
    source = Mami(str(make_dataset(tmp_path)))
    record = source.load(list(source.entries())[1])

    assert record.image == (tmp_path / "15236.jpg").read_bytes()
    assert (record.id, record.image_format, record.split, record.source) == ("15236", "jpg", "train", "mami")
    assert record.text == "Ça c'est la “vie” 😂" and record.meta == {"file_name": "15236.jpg"}


def test_test_split_is_unlabeled_without_test_labels(tmp_path):
    entries = list(Mami(str(make_dataset(tmp_path)), splits=["test"]).entries())
    assert [(e.split, e.id, e.labels) for e in entries] == [("test", "15000", {}), ("test", "15001", {})]
    assert entries[1].text == "Ünïcödé, quoted"


@pytest.mark.parametrize("relative", [True, False])
def test_test_labels_are_joined_and_mismatches_logged(tmp_path, caplog, relative):
    labels = "test_labels.txt" if relative else str(tmp_path / "test_labels.txt")
    source = Mami(str(make_dataset(tmp_path)), splits=["test"], test_labels=labels)
    with caplog.at_level(logging.WARNING, logger="memetrain.data.sources.mami"):
        entries = list(source.entries())

    assert [(e.id, e.labels) for e in entries] == [
        ("15000", {}),
        ("15001", {"misogynous": 1, "shaming": 0, "stereotype": 0, "objectification": 1, "violence": 0}),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "1 memes of Test.csv have no row in the test labels and stay unlabeled: 15000",
        "1 test label rows name no meme of Test.csv and are ignored: 99999",
    ]


def test_a_test_csv_with_label_columns_is_labeled(tmp_path):
    make_dataset(tmp_path, training=None, test=[HEADER, "15000.jpg\t0\t0\t0\t0\t1\tlabeled test"])
    entries = list(Mami(str(tmp_path)).entries())
    assert [(e.split, e.id, e.labels["violence"]) for e in entries] == [("test", "15000", 1)]
    with pytest.raises(ValueError, match="Test.csv has label columns already; drop test_labels"):
        Mami(str(tmp_path), test_labels="test_labels.txt")


def test_bad_rows_are_rejected_by_line_and_the_rest_loads(tmp_path):
    training = [
        *TRAINING[:2],
        b"10002.jpg\t0\t0\t0\t0\t0\tcaf\xe9 au lait",  # Latin-1
        "10003.jpg\t0\t0\t0\t0\ttoo few columns",
        "10004.jpg\t0\t0\t0\t0\t0\tone\ttoo many",
        '10005.jpg\t"0\t0\t0\t0\t0\tstray quote',  # must not swallow the next lines
        "10006.jpg\t2\t0\t0\t0\t0\ttwo",
        "10007.jpg\t0\tyes\t0\t0\t0\tyes",
        "10008.jpg\t0\t0\t\t0\t0\tempty label",
        "../10009.jpg\t0\t0\t0\t0\t0\tescape",
        "",
        *TRAINING[2:],
    ]
    items = list(Mami(str(make_dataset(tmp_path, training=training, test=None))).entries())
    entries = [item.id for item in items if isinstance(item, Entry)]
    rejected = {item.id: item.reason for item in items if isinstance(item, Rejected)}

    assert entries == ["1", "15236", "10001"]
    assert rejected == {
        "10002": "line 3 of training.csv: the line is not valid UTF-8 (byte 0xe9 at offset 23); "
        "re-save the file as UTF-8",
        "line 4 of training.csv": "line 4 of training.csv: 6 columns where the header has 7",
        "line 5 of training.csv": "line 5 of training.csv: 8 columns where the header has 7",
        "line 6 of training.csv": "line 6 of training.csv: 2 columns where the header has 7",
        "10006": "line 7 of training.csv: label 'misogynous' is '2'; expected 0 or 1",
        "10007": "line 8 of training.csv: label 'shaming' is 'yes'; expected 0 or 1",
        "10008": "line 9 of training.csv: label 'stereotype' is ''; expected 0 or 1",
        "line 10 of training.csv": f"line 10 of training.csv: image path '../10009.jpg' leaves the dataset "
        f"folder {tmp_path}; make it relative to it",
    }
    assert {item.split for item in items} == {"train"}


def test_unreadable_images_are_rejected_at_load(tmp_path):
    make_dataset(tmp_path, test=None)
    (tmp_path / "1.jpg").unlink()
    (tmp_path / "15236.jpg").write_bytes(b"")
    (tmp_path / "10001.jpg").write_text("GIF? no, text")
    source = Mami(str(tmp_path))
    reasons = []
    for entry in source.entries():
        with pytest.raises(Rejected) as caught:
            source.load(entry)
        reasons.append((caught.value.id, caught.value.split, caught.value.reason))

    assert reasons == [
        ("1", "train", "image file 1.jpg not found"),
        ("15236", "train", "image file 15236.jpg is empty (0 bytes)"),
        ("10001", "train", "image file 10001.jpg is not a JPEG, PNG, GIF, BMP or WebP image"),
    ]


def test_bad_headers(tmp_path):
    make_dataset(tmp_path, training=["file_name\tmisogynous\ttext"], test=None)
    with pytest.raises(
        ValueError, match="has no column 'Text Transcription'; its columns are: file_name, misog"
    ):
        Mami(str(tmp_path))
    make_dataset(tmp_path, training=["file_name\tmisogynous\tText Transcription"], test=None)
    with pytest.raises(ValueError, match="has no column 'shaming'"):
        Mami(str(tmp_path))


def test_missing_files_and_splits(tmp_path):
    with pytest.raises(ValueError, match="MAMI folder .*nowhere does not exist"):
        Mami(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"no MAMI annotation file in .*: expected training\.csv, Test\.csv"):
        Mami(str(tmp_path))
    make_dataset(tmp_path, test=None)
    with pytest.raises(
        ValueError, match=r"split 'test' needs Test\.csv, which is not in .* \(found training\.csv\)"
    ):
        Mami(str(tmp_path), splits=["test"])
    with pytest.raises(ValueError, match="unknown MAMI split 'dev'; choose from train, test"):
        Mami(str(tmp_path), splits=["dev"])


def test_bad_test_labels_files(tmp_path):
    make_dataset(tmp_path)
    with pytest.raises(ValueError, match="MAMI test labels file .*gold.txt not found"):
        Mami(str(tmp_path), test_labels="gold.txt")
    write_lines(tmp_path / "gold.txt", ["15000.jpg\t1\t0\t0\t0", "15001.jpg\t0\t0\t0\t0\t0"])
    with pytest.raises(ValueError, match="line 1 of gold.txt: expected a file name and the five labels"):
        Mami(str(tmp_path), test_labels="gold.txt")
    write_lines(tmp_path / "gold.txt", ["15000.jpg\t1\t0\t0\t0\t0", "15001.jpg\t0\t0\t2\t0\t0"])
    with pytest.raises(ValueError, match="line 2 of gold.txt: label 'stereotype' is '2'"):
        Mami(str(tmp_path), test_labels="gold.txt")
    write_lines(tmp_path / "gold.txt", ["15000.jpg\t1\t0\t0\t0\t0", "15000.jpg\t0\t0\t0\t0\t0"])
    with pytest.raises(ValueError, match="line 2 of gold.txt: 15000.jpg is labeled twice"):
        Mami(str(tmp_path), test_labels="gold.txt")
    write_lines(tmp_path / "gold.txt", [HEADER.rsplit("\t", 1)[0], "15000.jpg\t1\t0\t0\t0\t0"])
    source = Mami(str(tmp_path), splits=["test"], test_labels="gold.txt")
    assert [e.labels.get("misogynous") for e in source.entries()] == [1, None]
