"""Hateful Memes (Facebook AI): ``<split>.jsonl`` annotation files and images in ``img/``.

One JSON object a line, e.g. ``{"id":1235,"img":"img\\/01235.png","label":0,"text":"..."}``; test
files have no ``label`` (or a null one): those memes are unlabeled. Fields other than id, img, label
and text (e.g. ``text_length``) are kept in ``meta``, with the JSON id as ``orig_id``.
"""

from __future__ import annotations

from collections.abc import Iterator

from memetrain.data.records import HATEFUL_LABELS, Entry, MemeRecord, Rejected, parse_label
from memetrain.data.sources._lines import (
    image_path,
    input_dir,
    json_object,
    load_record,
    located,
    read_lines,
    split_files,
)

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")
_FIELDS = ("id", "img", "label", "text")


class HatefulMemes:
    name = "hateful_memes"
    label_names = HATEFUL_LABELS
    main_label = "hateful"
    label_classes: dict[str, tuple[str, ...]] = {}  # every label is 0/1

    def __init__(self, input: str, splits: list[str] | None = None):
        """``splits``: file stems to read (any ``<name>.jsonl``, e.g. the first release's ``dev``);
        None reads every one of :data:`SPLITS` that exists."""
        self.root = input_dir(input, "Hateful Memes")
        files = {split: f"{split}.jsonl" for split in (*SPLITS, *(splits or ()))}
        self.files = split_files(self.root, files, splits, "Hateful Memes")

    def entries(self) -> Iterator[Entry | Rejected]:
        for split, path in self.files.items():
            for number, text, problem in read_lines(path):
                yield located(f"line {number} of {path.name}", split, problem, self._entry, split, text)

    def load(self, entry: Entry) -> MemeRecord:
        return load_record(entry, self.root, self.name)

    def _entry(self, split: str, text: str) -> Entry:
        row = json_object(text)
        orig = row.get("id")
        if isinstance(orig, bool) or not isinstance(orig, (int, str)) or orig == "":
            raise Rejected(
                "", f"'id' is {orig!r}; expected an integer or a string" if "id" in row else "no 'id' field"
            )
        if "img" not in row:
            raise Rejected(str(orig), "no 'img' field")
        path = image_path(str(orig), self.root, row["img"])
        id = _meme_id(orig, path.stem)
        label = row.get("label")
        labels = {} if label is None else {"hateful": parse_label(id, "hateful", label)}
        meta = {"orig_id": orig, **{k: v for k, v in row.items() if k not in _FIELDS}}
        return Entry(id, split, path, row.get("text"), labels, meta)


def _meme_id(orig: int | str, stem: str) -> str:
    """The id, as the image's zero-padded name when it is the same number (1235 -> "01235"), so
    that the id names the image as the dataset's own file names do."""
    if stem.isdecimal() and str(orig).isdecimal() and int(stem) == int(orig):
        return stem
    return str(orig)
