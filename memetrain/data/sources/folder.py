"""Any folder of images with one annotation file: CSV, TSV or JSON lines, columns named by options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from memetrain.data.records import Entry, MemeRecord, Rejected, parse_label
from memetrain.data.sources._lines import (
    csv_row,
    image_path,
    input_dir,
    json_object,
    load_record,
    located,
    read_lines,
    read_table,
    require_columns,
)
from memetrain.errors import ConfigError

_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSON_LINES = (".jsonl", ".json")


class FolderSource:
    name = "folder"

    def __init__(
        self,
        input: str,
        annotations: str,
        id_column: str = "id",
        image_column: str = "image",
        text_column: str = "text",
        label_columns: list[str] | None = None,
        split_column: str | None = None,
        split: str = "train",
        main_label: str | None = None,
        delimiter: str | None = None,
    ):
        """``annotations``: the file, relative to ``input``; its format follows its extension (.csv,
        .tsv, .jsonl or .json for JSON lines) unless ``delimiter`` is given. Image paths are relative
        to ``input``; an empty id falls back to the image file's stem. ``split_column`` overrides the
        fixed ``split``. Memes with every label cell empty are unlabeled; ``label_columns=[]`` reads
        memes without labels (to score them; a pack needs at least one label column)."""
        self.root = input_dir(input, "dataset")
        self.path = self.root / annotations
        if not self.path.is_file():
            raise ConfigError(f"annotation file {self.path} not found")
        self.id_column, self.image_column, self.text_column = id_column, image_column, text_column
        self.label_names = tuple(["label"] if label_columns is None else label_columns)
        self.main_label = main_label or (self.label_names[0] if self.label_names else None)
        self.label_classes: dict[str, tuple[str, ...]] = {}  # every label column is 0/1
        if self.label_names and self.main_label not in self.label_names:
            raise ConfigError(
                f"main_label {self.main_label!r} is not one of label_columns {self.label_names}"
            )
        self.split_column, self.split = split_column, split
        suffix = self.path.suffix.lower()
        self.delimiter = delimiter or _DELIMITERS.get(suffix)
        if self.delimiter is None and suffix not in _JSON_LINES:
            raise ConfigError(
                f"cannot tell the format of {self.path}: name it .csv, .tsv or .jsonl, or give delimiter"
            )
        self.header = None if self.delimiter is None else read_table(self.path, self.delimiter)[0]
        wanted = [image_column, text_column, *self.label_names, *([split_column] if split_column else [])]
        require_columns(self.path, self.columns(), wanted)

    def columns(self) -> list[str]:
        """The annotation file's column names (a JSON lines file's keys)."""
        return self._json_keys() if self.header is None else list(self.header)

    def entries(self) -> Iterator[Entry | Rejected]:
        split = None if self.split_column else self.split
        lines = read_lines(self.path) if self.header is None else read_table(self.path, self.delimiter)[1]
        for number, text, problem in lines:
            yield located(f"line {number} of {self.path.name}", split, problem, self._entry, text)

    def load(self, entry: Entry) -> MemeRecord:
        return load_record(entry, self.root, self.name)

    def _row(self, text: str) -> dict[str, Any]:
        return json_object(text) if self.header is None else csv_row(text, self.header, self.delimiter)

    def _json_keys(self) -> list[str]:
        """Every key of any object in the JSON lines file (a key may be absent from some lines)."""
        keys: dict[str, None] = {}
        for _, text, _ in read_lines(self.path):
            with suppress(Rejected):  # entries() reports the line
                keys.update(dict.fromkeys(json_object(text)))
        return list(keys)

    def _entry(self, text: str) -> Entry:
        row = self._row(text)
        id = _cell(row.get(self.id_column))
        path = image_path(id, self.root, row.get(self.image_column))
        id = id or path.stem
        cells = {name: _cell(row.get(name)) for name in self.label_names}
        empty = [name for name, value in cells.items() if value == ""]
        if empty and len(empty) < len(cells):
            filled = [name for name in cells if name not in empty]
            raise Rejected(id, f"{', '.join(empty)} empty while {', '.join(filled)} set: label all or none")
        labels = {} if empty else {name: parse_label(id, name, row[name]) for name in self.label_names}
        split = _cell(row.get(self.split_column)) if self.split_column else self.split
        if not split:
            raise Rejected(id, f"split column {self.split_column!r} is empty")
        used = {self.id_column, self.image_column, self.text_column, *self.label_names, self.split_column}
        meta = {key: value for key, value in row.items() if key not in used}
        return Entry(id, split, path, row.get(self.text_column), labels, meta)


def _cell(value: Any) -> str:
    """A cell as a stripped string; missing (None) and blank cells are ""."""
    return "" if value is None else str(value).strip()
