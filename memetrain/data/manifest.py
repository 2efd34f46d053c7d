"""``manifest.json``: what a pack wrote, so a stream can trust (and check) the shards it reads.

The manifest is written last and atomically: a directory without one holds no finished pack.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memetrain.errors import MemetrainError
from memetrain.fileio import atomic_write_json

SCHEMA_VERSION = 3  # 2: every split has a sample index; 3: label columns may hold class ids (label_classes)
READABLE_SCHEMAS = (2, 3)  # a schema-2 pack reads as one whose label columns are all 0/1
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar$")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_]+\.(index|tokens)\.npz$")  # a split's sample index or token table
_URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]*:/)")
"""A pipe: command or a URL (``https://``, ``s3://``; also as a Path has folded it to ``https:/``)."""
MANIFEST_NAME = "manifest.json"


class ManifestError(MemetrainError):
    """The manifest or a shard it lists is missing, malformed or does not match."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo]
    index: ShardInfo  # the SampleIndex of the split's shards (``samples``: its rows)
    label_histogram: dict[str, dict[str, int]] = field(default_factory=dict)
    unlabeled: int = 0
    tokens: ShardInfo | None = None  # the TokenTable of the split's texts, when a tokenizer was packed

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


@dataclass
class Manifest:
    source: str
    label_names: list[str]
    main_label: str
    options: dict[str, Any]
    splits: dict[str, SplitInfo]
    rejected: list[dict[str, Any]]
    tokenizer: str | None
    tokenizer_sha256: str | None = None  # of the tokenizer whose ids the splits' token tables hold
    label_classes: dict[str, list[str]] = field(default_factory=dict)
    """Class names of the label columns that hold class ids (0 .. K-1, -1 missing), such as
    SynthMemes' ``image_class``; every column not listed holds 0/1 labels (-1 missing)."""
    schema_version: int = SCHEMA_VERSION
    root: Path | None = field(default=None, compare=False)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        if _URL.match(str(directory)):
            raise ManifestError(
                f"{directory}: memetrain reads shards only from a local directory (no pipe: or URLs, "
                "never: a pipe runs a command, a URL fetches unchecked data); copy or mount them locally"
            )
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            hint = " (an interrupted pack leaves none: run the pack again)" if directory.is_dir() else ""
            raise ManifestError(
                f"no {MANIFEST_NAME} in {directory}{hint}; pack the data with launcher/pack.py"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            version = raw.get("schema_version")
            if version not in READABLE_SCHEMAS:
                raise ManifestError(
                    f"{path} has schema version {version}, this memetrain reads "
                    f"{', '.join(map(str, READABLE_SCHEMAS))}; re-pack"
                )
            splits = {
                name: SplitInfo(
                    shards=[ShardInfo(**shard) for shard in split["shards"]],
                    label_histogram=split["label_histogram"],
                    unlabeled=split["unlabeled"],
                    index=ShardInfo(**split["index"]),
                    tokens=ShardInfo(**split["tokens"]) if split["tokens"] else None,
                )
                for name, split in raw["splits"].items()
            }
            return cls(
                source=raw["source"],
                label_names=list(raw["label_names"]),
                main_label=raw["main_label"],
                options=raw["options"],
                splits=splits,
                rejected=raw["rejected"],
                tokenizer=raw["tokenizer"],
                tokenizer_sha256=raw["tokenizer_sha256"],
                label_classes=_label_classes(raw, version, path),
                schema_version=version,
                root=directory,
            )
        except ManifestError:
            raise
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(
                f"{path} is not a valid memetrain manifest ({type(err).__name__}: {err})"
            ) from None

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        payload = asdict(self)
        payload.pop("root")
        for split in payload["splits"].values():
            split["samples"] = sum(shard["samples"] for shard in split["shards"])
        atomic_write_json(path, payload)
        return path

    def label_sizes(self) -> list[int]:
        """Per label column, in ``label_names`` order, how many values it takes: 2 for a 0/1 label,
        the number of classes for a class-id column."""
        return label_sizes(self.label_names, self.label_classes)

    def binary_labels(self) -> list[str]:
        """The label columns that hold 0/1 labels (what classifiers predict)."""
        return [name for name in self.label_names if name not in self.label_classes]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"split {name!r} is not in {self.root}/{MANIFEST_NAME}; it has: {', '.join(self.splits) or 'none'}"
            )
        return self.splits[name]

    def shard_path(self, shard: ShardInfo) -> Path:
        """Shards are plain files in the manifest's directory: never a URL, a pipe or another folder."""
        assert self.root is not None, "manifest was not loaded from a directory"
        if not _SHARD_NAME.match(shard.name):
            raise ManifestError(
                f"shard name {shard.name!r} in {self.root}/{MANIFEST_NAME} is not a file name in that directory; "
                "memetrain reads shards only from the manifest's own directory (no pipe:, URLs or paths)"
            )
        return self.root / shard.name

    def index_path(self, split: str) -> Path:
        """The split's sample index (see ``sample_index.SampleIndex``), checked as a shard would be."""
        return self._table_path(self.split(split).index, "sample index")

    def tokens_path(self, split: str) -> Path | None:
        """The split's token table (see ``tokenizer.TokenTable``) checked as a shard would be, or
        None for a pack without a tokenizer."""
        info = self.split(split).tokens
        return None if info is None else self._table_path(info, "token table")

    def _table_path(self, info: ShardInfo, what: str) -> Path:
        if not _TABLE_NAME.match(info.name):
            raise ManifestError(
                f"{what} name {info.name!r} in {self.root}/{MANIFEST_NAME} is not a file name in that "
                "directory; re-pack"
            )
        path = self.root / info.name
        if not path.is_file() or path.stat().st_size != info.bytes:
            raise ManifestError(
                f"{what} {path} is missing or not the {info.bytes} bytes the manifest lists; re-pack, or "
                "restore it from the pack"
            )
        if file_sha256(path) != info.sha256:
            raise ManifestError(f"{what} {path} does not match its sha256 in the manifest; re-pack")
        return path

    def verify(self, split: str, checksums: bool = True) -> None:
        """Every shard of ``split`` exists with its recorded size (and sha256 when ``checksums``)."""
        for shard in self.split(split).shards:
            path = self.shard_path(shard)
            if not path.is_file():
                raise ManifestError(f"shard {path} listed in the manifest is missing; re-pack or restore it")
            size = path.stat().st_size
            if size != shard.bytes:
                raise ManifestError(
                    f"shard {path} is {size} bytes, the manifest says {shard.bytes}: it is truncated or "
                    "was replaced; re-pack or restore it"
                )
            if checksums and file_sha256(path) != shard.sha256:
                raise ManifestError(
                    f"shard {path} does not match its sha256 in the manifest: it is corrupt or was "
                    "modified; re-pack or restore it"
                )


MAX_CLASSES = 127
"""Classes a class-id label column may have (sample indexes keep labels as int8)."""


def _label_classes(raw: dict[str, Any], version: int, path: Path) -> dict[str, list[str]]:
    """A schema-3 manifest's ``label_classes``, checked: columns it lists, 2 to MAX_CLASSES names each."""
    if version < 3:
        return {}
    classes = {name: list(values) for name, values in raw["label_classes"].items()}
    for name, values in classes.items():
        if (
            name not in raw["label_names"]
            or not 2 <= len(values) <= MAX_CLASSES
            or len(set(values)) != len(values)
        ):
            raise ManifestError(
                f"{path}: label_classes[{name!r}] must be a label column's 2 to {MAX_CLASSES} distinct class "
                "names; re-pack"
            )
    return classes


def label_sizes(label_names: list[str], label_classes: dict[str, list[str]]) -> list[int]:
    """2 for each 0/1 column, the number of classes for each class-id column of ``label_classes``."""
    return [len(label_classes[name]) if name in label_classes else 2 for name in label_names]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
