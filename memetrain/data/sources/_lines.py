"""What the file-based sources share: annotation files read one line at a time, image paths kept
inside the dataset folder, and the image read that turns an entry into a record.

Lines are decoded one by one, so a line that is not UTF-8, is not valid JSON or has the wrong number
of columns costs one meme (a :class:`Rejected` naming the file and line), not the whole file.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from memetrain.data.images import read_image_file
from memetrain.data.records import Entry, MemeRecord, Rejected
from memetrain.errors import ConfigError

Line = tuple[int, str, str | None]
"""(line number from 1, text, why the line is not UTF-8 or None)."""


def input_dir(input: str, what: str) -> Path:
    root = Path(input)
    if not root.is_dir():
        raise ConfigError(f"{what} folder {input} does not exist or is not a directory")
    return root


def split_files(root: Path, files: dict[str, str], splits: list[str] | None, what: str) -> dict[str, Path]:
    """The annotation file of each split named in ``splits``; all of ``files`` that exist when None."""
    present = {split: root / name for split, name in files.items() if (root / name).is_file()}
    if not present:
        raise ConfigError(f"no {what} annotation file in {root}: expected {', '.join(files.values())}")
    found = ", ".join(path.name for path in present.values())
    for split in splits or ():
        if split not in files:
            raise ConfigError(f"unknown {what} split {split!r}; choose from {', '.join(files)}")
        if split not in present:
            raise ConfigError(f"split {split!r} needs {files[split]}, which is not in {root} (found {found})")
    return present if splits is None else {split: present[split] for split in splits}


def read_lines(path: Path) -> Iterator[Line]:
    """The non-blank lines of a text file. A line that is not UTF-8 comes with its bad bytes as
    surrogate escapes and a reason, so the caller can still read the line's id to reject it by."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            text, problem = raw.decode("utf-8"), None
        except UnicodeDecodeError as err:
            text = raw.decode("utf-8", "surrogateescape")
            problem = (
                f"the line is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                "re-save the file as UTF-8"
            )
        yield number, text, problem


def split_row(text: str, delimiter: str) -> list[str]:
    """The fields of one CSV line. A quoted field may not span lines: a stray quote then costs one
    row (its column count is wrong) rather than silently swallowing the rows after it."""
    return next(csv.reader([text], delimiter=delimiter))


def read_table(path: Path, delimiter: str) -> tuple[list[str], Iterator[Line]]:
    """The header (first line) of a delimited file and its remaining lines."""
    lines = read_lines(path)
    first = next(lines, None)
    if first is None:
        raise ConfigError(f"{path} is empty; expected a header line naming the columns")
    if first[2]:
        raise ConfigError(f"the header of {path} (line {first[0]}): {first[2]}")
    return [name.strip() for name in split_row(first[1], delimiter)], lines


def require_columns(path: Path, found: Iterable[str], wanted: Iterable[str]) -> None:
    found = list(found)
    for column in wanted:
        if column not in found:
            raise ConfigError(f"{path} has no column {column!r}; its columns are: {', '.join(found)}")


def csv_row(text: str, header: list[str], delimiter: str) -> dict[str, str]:
    fields = split_row(text, delimiter)
    if len(fields) != len(header):
        raise Rejected("", f"{len(fields)} columns where the header has {len(header)}")
    return dict(zip(header, fields))


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise Rejected("", f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise Rejected("", f"a JSON {type(value).__name__}, expected an object")
    return value


def located(
    where: str, split: str | None, problem: str | None, make: Callable[..., Entry], *args: Any
) -> Entry | Rejected:
    """``make(*args)``, or why not, prefixed by ``where`` (e.g. "line 7 of train.jsonl").

    A ``Rejected`` raised with id "" (not known yet) takes ``where`` as its id. A line that is not
    UTF-8 is rejected for that even if it parses, under its id when one could be read.
    """
    try:
        entry = make(*args)
        if problem:
            raise Rejected(entry.id, problem)
        return entry
    except Rejected as rejected:
        return Rejected(rejected.id or where, f"{where}: {problem or rejected.reason}", split)


def image_path(id: str, root: Path, name: Any) -> Path:
    """``name`` as a path inside ``root``: absolute paths and '..' that leave it are refused."""
    if not isinstance(name, str) or not name.strip():
        raise Rejected(id, f"image path is {name!r}; expected a file path relative to {root}")
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise Rejected(id, f"image path {name!r} leaves the dataset folder {root}; make it relative to it")
    return root / norm


def load_record(entry: Entry, root: Path, source: str) -> MemeRecord:
    """The entry's image (``entry.ref``, a path under ``root``) read and sniffed, with its annotations."""
    try:
        image, image_format = read_image_file(entry.id, entry.ref, entry.ref.relative_to(root).as_posix())
    except Rejected as rejected:
        raise Rejected(rejected.id, rejected.reason, entry.split) from None
    return MemeRecord(
        id=entry.id,
        image=image,
        image_format=image_format,
        text=entry.text,  # checked by the packer (check_text), like every source's text
        labels=dict(entry.labels),
        split=entry.split,
        source=source,
        meta=dict(entry.meta),
    )
