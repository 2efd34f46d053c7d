"""MAMI (SemEval-2022 Task 5): tab-separated ``training.csv`` and ``Test.csv``, images beside them.

Columns: ``file_name``, the five labels of :data:`MAMI_LABELS` and ``Text Transcription``. The official
``Test.csv`` has no label columns; its labels come from ``test_labels.txt`` (tab-separated, no header:
file name then the five labels). A file whose header has the label columns is read as labeled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from memetrain.data.records import MAMI_LABELS, Entry, MemeRecord, Rejected, parse_label
from memetrain.data.sources._lines import (
    csv_row,
    image_path,
    input_dir,
    load_record,
    located,
    read_lines,
    read_table,
    require_columns,
    split_files,
    split_row,
)
from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

FILES = {"train": "training.csv", "test": "Test.csv"}
FILE_NAME, TEXT = "file_name", "Text Transcription"


class Mami:
    name = "mami"
    label_names = MAMI_LABELS
    main_label = "misogynous"
    label_classes: dict[str, tuple[str, ...]] = {}  # every label is 0/1

    def __init__(self, input: str, splits: list[str] | None = None, test_labels: str | None = None):
        """``test_labels``: the labels of ``Test.csv`` (a path relative to ``input`` or absolute)."""
        self.root = input_dir(input, "MAMI")
        self.files = split_files(self.root, FILES, splits, "MAMI")
        self.labeled = {split: _has_labels(path) for split, path in self.files.items()}
        self.test_labels: dict[str, dict[str, int]] | None = None
        if test_labels is not None and "test" in self.files:
            if self.labeled["test"]:
                raise ConfigError(f"{self.files['test']} has label columns already; drop test_labels")
            self.test_labels = _read_test_labels(self.root / test_labels)

    def entries(self) -> Iterator[Entry | Rejected]:
        for split, path in self.files.items():
            header, lines = read_table(path, "\t")
            seen, unlabeled = set(), []
            for number, text, problem in lines:
                where = f"line {number} of {path.name}"
                item = located(where, split, problem, self._entry, split, header, text)
                seen.add(item.id)
                if isinstance(item, Entry) and not item.labels:
                    unlabeled.append(item.id)
                yield item
            if split == "test" and self.test_labels is not None:
                _warn_unmatched(path.name, unlabeled, set(self.test_labels) - seen)

    def load(self, entry: Entry) -> MemeRecord:
        return load_record(entry, self.root, self.name)

    def _entry(self, split: str, header: list[str], text: str) -> Entry:
        row = csv_row(text, header, "\t")
        path = image_path("", self.root, row[FILE_NAME])
        id = path.stem
        if self.labeled[split]:
            labels = {name: parse_label(id, name, row[name]) for name in MAMI_LABELS}
        elif split == "test" and self.test_labels is not None:
            labels = self.test_labels.get(id, {})
        else:
            labels = {}
        return Entry(id, split, path, row[TEXT], labels, {"file_name": row[FILE_NAME]})


def _has_labels(path: Path) -> bool:
    """Whether the file has the label columns (all five: a partial set is an error)."""
    header, _ = read_table(path, "\t")
    require_columns(path, header, (FILE_NAME, TEXT))
    present = [name for name in MAMI_LABELS if name in header]
    if present:
        require_columns(path, header, MAMI_LABELS)
    return bool(present)


def _read_test_labels(path: Path) -> dict[str, dict[str, int]]:
    """Labels by id. The file is small and official, so any bad line is an error, not a skip."""
    if not path.is_file():
        raise ConfigError(f"MAMI test labels file {path} not found")
    labels: dict[str, dict[str, int]] = {}
    for number, text, problem in read_lines(path):
        where = f"line {number} of {path.name}"
        fields = split_row(text, "\t")
        if number == 1 and fields[0] == FILE_NAME:  # tolerate a header
            continue
        if problem or len(fields) != 1 + len(MAMI_LABELS):
            raise ConfigError(
                f"{where}: {problem or 'expected a file name and the five labels, tab-separated'}"
            )
        id = Path(fields[0]).stem
        if id in labels:
            raise ConfigError(f"{where}: {fields[0]} is labeled twice")
        try:
            labels[id] = {name: parse_label(id, name, value) for name, value in zip(MAMI_LABELS, fields[1:])}
        except Rejected as rejected:
            raise ConfigError(f"{where}: {rejected.reason}") from None
    return labels


def _warn_unmatched(file: str, unlabeled: list[str], unknown: set[str]) -> None:
    if unlabeled:
        log.warning(
            "%d memes of %s have no row in the test labels and stay unlabeled: %s",
            len(unlabeled),
            file,
            _some(unlabeled),
        )
    if unknown:
        log.warning(
            "%d test label rows name no meme of %s and are ignored: %s",
            len(unknown),
            file,
            _some(sorted(unknown)),
        )


def _some(ids: list[str], shown: int = 10) -> str:
    return ", ".join(ids[:shown]) + (", ..." if len(ids) > shown else "")
