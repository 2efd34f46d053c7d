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

SCHEMA_VERSION = 2  # 2: every split has a sample index
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
            if version != SCHEMA_VERSION:
                raise ManifestError(
                    f"{path} has schema version {version}, this memetrain reads {SCHEMA_VERSION}; re-pack"
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


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
