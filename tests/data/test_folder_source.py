"""FolderSource reads a folder of images with a CSV, TSV or JSON lines annotation file."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from memetrain.data.records import Entry, Rejected
from memetrain.data.sources.folder import FolderSource


def write_image(path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (0, 200, 0)).save(path, format=fmt)


def write_lines(path: Path, lines: list[str | bytes]) -> None:
    raw = [line if isinstance(line, bytes) else line.encode("utf-8") for line in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")


def make_folder(root: Path, name: str, lines: list[str | bytes]) -> Path:
    write_image(root / "images" / "a.png")
    write_image(root / "images" / "b.jpg", "JPEG")
    write_image(root / "images" / "c.png")
    write_lines(root / name, lines)
    return root


def outcomes(items: list[Entry | Rejected]) -> tuple[list[str], dict[str, str]]:
    entries = [item.id for item in items if isinstance(item, Entry)]
    return entries, {item.id: item.reason for item in items if isinstance(item, Rejected)}


def test_csv_with_default_columns(tmp_path):
    lines = [
        "id,image,text,label,source_url",
        'm1,images/a.png,"hello, world",1,http://x',
        ",images/b.jpg,id from the image name,0,",
        "m3,images/c.png,“unlabeled” 😂,,",
    ]
    source = FolderSource(str(make_folder(tmp_path, "memes.csv", lines)), "memes.csv")
    entries = list(source.entries())

    assert [(e.id, e.split, e.text, e.labels) for e in entries] == [
        ("m1", "train", "hello, world", {"label": 1}),
        ("b", "train", "id from the image name", {"label": 0}),
        ("m3", "train", "“unlabeled” 😂", {}),
    ]
    assert entries[0].meta == {"source_url": "http://x"}
    assert entries[0].ref == tmp_path / "images" / "a.png"
    assert (source.name, source.label_names, source.main_label) == ("folder", ("label",), "label")
    record = source.load(entries[1])
    assert (record.id, record.image_format, record.source) == ("b", "jpg", "folder")
    assert record.image == (tmp_path / "images" / "b.jpg").read_bytes()


def test_tsv_with_named_columns_and_split_column(tmp_path):
    lines = [
        "name\tpath\tcaption\tharm\toffense\tpart",
        "x1\timages/a.png\tfirst\t1\t0\tdev",
        "x2\timages/c.png\tsecond\t0\t0\ttest",
    ]
    source = FolderSource(
        str(make_folder(tmp_path, "ann.tsv", lines)),
        "ann.tsv",
        id_column="name",
        image_column="path",
        text_column="caption",
        label_columns=["harm", "offense"],
        split_column="part",
        main_label="offense",
    )
    entries = list(source.entries())
    assert [(e.id, e.split, dict(e.labels)) for e in entries] == [
        ("x1", "dev", {"harm": 1, "offense": 0}),
        ("x2", "test", {"harm": 0, "offense": 0}),
    ]
    assert (source.label_names, source.main_label) == (("harm", "offense"), "offense")


def test_explicit_delimiter(tmp_path):
    make_folder(tmp_path, "ann.txt", ["id;image;text;label", "k;images/a.png;semi;colon;0"])
    with pytest.raises(ValueError, match="cannot tell the format of .*ann.txt: name it .csv, .tsv or .jsonl"):
        FolderSource(str(tmp_path), "ann.txt")
    items = list(FolderSource(str(tmp_path), "ann.txt", delimiter=";").entries())
    assert [(i.id, i.reason) for i in items] == [
        ("line 2 of ann.txt", "line 2 of ann.txt: 5 columns where the header has 4")
    ]


def test_jsonl_with_missing_and_partial_labels(tmp_path):
    lines = [
        '{"id": 7, "image": "images\\/a.png", "text": "seven", "hate": 1, "irony": 0, "extra": [1]}',
        '{"image": "images/b.jpg", "text": "no labels at all"}',
        '{"id": "p", "image": "images/c.png", "text": "partial", "hate": 1, "irony": null}',
        '{"id": "q", "image": "images/c.png", "text": "blank", "hate": "", "irony": ""}',
    ]
    make_folder(tmp_path, "ann.jsonl", lines)
    items = list(FolderSource(str(tmp_path), "ann.jsonl", label_columns=["hate", "irony"]).entries())
    entries, rejected = outcomes(items)

    assert entries == ["7", "b", "q"]
    assert items[0].labels == {"hate": 1, "irony": 0} and items[0].meta == {"extra": [1]}
    assert items[1].labels == {} and items[3].labels == {}
    assert rejected == {"p": "line 3 of ann.jsonl: irony empty while hate set: label all or none"}


def test_bad_lines_are_rejected_by_line_and_the_rest_loads(tmp_path):
    lines = [
        '{"id": "ok1", "image": "images/a.png", "text": "fine", "label": 0, "split": "train"}',
        b'{"id": "latin", "image": "images/a.png", "text": "\xe9t\xe9", "label": 0, "split": "train"}',
        b"\xff\xfe\x00{",
        '{"id": "broken", "image": ',
        '"just a string"',
        '{"id": "two", "image": "images/a.png", "text": "t", "label": 2, "split": "train"}',
        '{"id": "yes", "image": "images/a.png", "text": "t", "label": "yes", "split": "train"}',
        '{"id": "bool", "image": "images/a.png", "text": "t", "label": false, "split": "train"}',
        '{"id": "nosplit", "image": "images/a.png", "text": "t", "label": 1, "split": ""}',
        '{"id": "up", "image": "../../etc/passwd", "text": "t", "label": 1, "split": "train"}',
        '{"id": "noimage", "text": "t", "label": 1, "split": "train"}',
        "",
        '{"id": "ok2", "image": "images/c.png", "text": "fine", "label": 1, "split": "dev"}',
    ]
    make_folder(tmp_path, "ann.jsonl", lines)
    items = list(FolderSource(str(tmp_path), "ann.jsonl", split_column="split").entries())
    entries, rejected = outcomes(items)

    assert entries == ["ok1", "ok2"]
    assert [i.split for i in items if isinstance(i, Entry)] == ["train", "dev"]
    assert list(rejected) == [
        "latin",
        "line 3 of ann.jsonl",
        "line 4 of ann.jsonl",
        "line 5 of ann.jsonl",
        "two",
        "yes",
        "bool",
        "nosplit",
        "up",
        "noimage",
    ]
    assert rejected["latin"].startswith("line 2 of ann.jsonl: the line is not valid UTF-8 (byte 0xe9")
    assert rejected["line 3 of ann.jsonl"].startswith(
        "line 3 of ann.jsonl: the line is not valid UTF-8 (byte 0xff"
    )
    assert rejected["line 4 of ann.jsonl"].startswith("line 4 of ann.jsonl: not valid JSON")
    assert rejected["line 5 of ann.jsonl"] == "line 5 of ann.jsonl: a JSON str, expected an object"
    assert rejected["two"] == "line 6 of ann.jsonl: label 'label' is 2; expected 0 or 1"
    assert rejected["yes"] == "line 7 of ann.jsonl: label 'label' is 'yes'; expected 0 or 1"
    assert rejected["bool"].startswith("line 8 of ann.jsonl: label 'label' is False (a boolean)")
    assert rejected["nosplit"] == "line 9 of ann.jsonl: split column 'split' is empty"
    assert "line 10 of ann.jsonl: image path '../../etc/passwd' leaves the dataset folder" in rejected["up"]
    assert rejected["noimage"].startswith("line 11 of ann.jsonl: image path is None")


def test_unreadable_images_are_rejected_at_load(tmp_path):
    lines = ["image,text,label", "images/gone.png,t,0", "images/empty.png,t,0", "images/notes.png,t,0"]
    make_folder(tmp_path, "ann.csv", lines)
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "notes.png").write_text("just notes")
    source = FolderSource(str(tmp_path), "ann.csv", split="test")
    reasons = []
    for entry in source.entries():
        with pytest.raises(Rejected) as caught:
            source.load(entry)
        reasons.append((caught.value.id, caught.value.split, caught.value.reason))

    assert reasons == [
        ("gone", "test", "image file images/gone.png not found"),
        ("empty", "test", "image file images/empty.png is empty (0 bytes)"),
        ("notes", "test", "image file images/notes.png is not a JPEG, PNG, GIF, BMP or WebP image"),
    ]


def test_missing_columns_are_refused_at_construction(tmp_path):
    make_folder(tmp_path, "ann.csv", ["id,image,caption,label", "a,images/a.png,t,0"])
    with pytest.raises(
        ValueError, match="ann.csv has no column 'text'; its columns are: id, image, caption, label"
    ):
        FolderSource(str(tmp_path), "ann.csv")
    with pytest.raises(ValueError, match="has no column 'part'"):
        FolderSource(str(tmp_path), "ann.csv", text_column="caption", split_column="part")
    write_lines(tmp_path / "ann.jsonl", ['{"image": "images/a.png", "text": "t"}', "{broken"])
    with pytest.raises(ValueError, match="ann.jsonl has no column 'label'; its columns are: image, text"):
        FolderSource(str(tmp_path), "ann.jsonl")


def test_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="dataset folder .*nowhere does not exist"):
        FolderSource(str(tmp_path / "nowhere"), "ann.csv")
    with pytest.raises(ValueError, match="annotation file .*ann.csv not found"):
        FolderSource(str(tmp_path), "ann.csv")
    make_folder(tmp_path, "ann.csv", ["image,text,label"])
    with pytest.raises(ValueError, match="main_label 'hate' is not one of label_columns"):
        FolderSource(str(tmp_path), "ann.csv", main_label="hate")
    write_lines(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="empty.csv is empty; expected a header line"):
        FolderSource(str(tmp_path), "empty.csv")


def test_memes_without_label_columns_are_read_unlabeled_and_not_packed(tmp_path):
    from memetrain.data.pack import PackOptions, pack

    make_folder(tmp_path, "ann.csv", ["image,text", "images/a.png,some words"])
    source = FolderSource(str(tmp_path), "ann.csv", label_columns=[])
    assert source.label_names == () and source.main_label is None
    [entry] = source.entries()
    assert entry.labels == {} and source.load(entry).text == "some words"
    with pytest.raises(ValueError, match="source folder reads no label column: a pack needs at least one"):
        pack(source, tmp_path / "pack", PackOptions(workers=1), {})
    assert not (tmp_path / "pack").exists()
