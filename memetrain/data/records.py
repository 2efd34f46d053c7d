"""The one record type every source produces, and the checks every record passes before packing.

A source reads its annotations into cheap :class:`Entry` objects (in the main process) and turns
one entry into a :class:`MemeRecord` with its image bytes on demand (in a pack worker). Anything
wrong with a meme is a :class:`Rejected` carrying the meme's id and a reason a person can act on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

HATEFUL_LABELS = ("hateful",)
MAMI_LABELS = ("misogynous", "shaming", "stereotype", "objectification", "violence")

IMAGE_FORMATS = ("jpg", "png")
"""Image extensions a shard may hold (the WebDataset member suffix)."""

_VALID_ID = re.compile(r"^[A-Za-z0-9_-]+$")


class Rejected(Exception):
    """A meme that cannot be packed; ``id`` names it and ``reason`` says why and what to do."""

    def __init__(self, id: str, reason: str, split: str | None = None):
        super().__init__(f"{id}: {reason}")
        self.id = str(id)
        self.reason = reason
        self.split = split

    def __reduce__(self):  # crosses process boundaries from pack workers
        return (Rejected, (self.id, self.reason, self.split))

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "split": self.split, "reason": self.reason}


@dataclass(frozen=True)
class Entry:
    """One annotated meme before its image is read.

    ``ref`` is whatever the source's ``load`` needs to produce the image (a path, a synthetic index).
    """

    id: str
    split: str
    ref: Any
    text: str | None
    labels: Mapping[str, int] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemeRecord:
    """A meme ready to pack: image bytes as stored on disk, its text, its labels ({} if unlabeled)."""

    id: str
    image: bytes
    image_format: str
    text: str
    labels: Mapping[str, int]
    split: str
    source: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_labeled(self) -> bool:
        return bool(self.labels)


class Source(Protocol):
    """What the packer needs from a dataset reader."""

    name: str
    label_names: tuple[str, ...]
    main_label: str
    label_classes: Mapping[str, tuple[str, ...]]
    """The label columns that hold class ids (0 .. K-1) rather than 0/1, with their K class names."""

    def entries(self) -> Iterator[Entry | Rejected]:
        """Annotations in file order; a line or row that cannot be parsed is a ``Rejected``."""

    def load(self, entry: Entry) -> MemeRecord:
        """The entry's meme with its image bytes; raises ``Rejected`` (missing or unreadable image)."""


def parse_label(id: str, name: str, value: Any) -> int:
    """A binary label from JSON (int) or CSV (string) form; anything but 0/1 is rejected."""
    if isinstance(value, bool):
        raise Rejected(id, f"label {name!r} is {value!r} (a boolean); expected 0 or 1")
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise Rejected(id, f"label {name!r} is {value!r}; expected 0 or 1")


def check_id(id: str) -> None:
    """Ids become WebDataset keys: a '.' or '/' in one would split or nest the sample."""
    if not _VALID_ID.match(id):
        raise Rejected(
            id,
            "id may only hold letters, digits, '_' and '-' (it becomes the WebDataset key, "
            "where '.' starts the extension and '/' a folder); rename the meme",
        )


def check_text(id: str, text: Any) -> str:
    if text is None:
        raise Rejected(id, "no text: every meme needs its overlaid text (an empty string is refused too)")
    if not isinstance(text, str):
        raise Rejected(id, f"text is a {type(text).__name__}, expected a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(id, "text is not valid UTF-8; re-save the annotation file as UTF-8") from None
    if not text.strip():
        raise Rejected(id, "text is empty; memetrain trains on image and text together")
    return text
