"""``<split>.index.npz``: where each sample's image and text lie in a split's shards, and its labels.

The pack writes one per split from the finished shards, read back with the tar reader. A stream
then reads a sample's two members at their byte offsets (:class:`ShardFile`) and takes the labels
from the table: no tar header is parsed and no JSON member read while training (together a tenth
of a loader worker's time at 224 px), and a split's labels come without opening a shard. The members are checked once, here: a sample that could not be streamed (a member path
that climbs out, no image or text member, a label that is not 0 or 1, or not one of its column's
class ids) is recorded with the reason, and the stream logs it by name as a bad sample when it meets it.

The index lists the sha256 of every shard it was made from, so one that no longer matches its
shards (a shard rewritten and the manifest edited to agree) is refused instead of read at stale
offsets.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memetrain.data.manifest import Manifest, ManifestError, ShardInfo
from memetrain.data.shard_reader import (
    MAX_MEMBER_BYTES,
    ShardFormatError,
    file_members,
    read_data,
    split_name,
)
from memetrain.fileio import atomic_writer

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.npz"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DATA_EXTENSIONS = IMAGE_EXTENSIONS + ("txt", "json", "cls")
"""Members a sample may have; any other (pickle, pyd, npy ...) is ignored and never read."""


@dataclass
class SampleIndex:
    """Rows in manifest order (shards in order, samples in archive order).

    ``image`` and ``text``: ``[N, 2]`` byte offset of the member's data in its shard and its size;
    ``labels``: ``[N, K]`` in ``label_names`` order, -1 unlabeled (0/1, or a class id 0 .. size-1 in a
    column of the manifest's ``label_classes``); ``problems``: why a sample cannot
    be streamed, ``""`` for one that can; ``shard_samples`` and ``shard_sha256``: the shards indexed.
    """

    keys: np.ndarray
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    problems: np.ndarray
    label_names: np.ndarray
    shard_samples: np.ndarray
    shard_sha256: np.ndarray

    @classmethod
    def from_shards(
        cls,
        root: Path,
        shards: Sequence[ShardInfo],
        label_names: Sequence[str],
        label_sizes: Sequence[int] | None = None,
    ) -> SampleIndex:
        """Index the WebDataset tars ``shards`` in ``root`` (header checksums verified; each one's
        sha256 is recorded as given, its samples as counted); a corrupt or truncated one raises
        :class:`ShardFormatError` naming it. ``label_sizes``: the values each label column takes
        (:meth:`Manifest.label_sizes`; None: all 0/1)."""
        sizes = _sizes(label_names, label_sizes)
        rows: list[tuple[str, tuple[int, int], tuple[int, int], list[int], str]] = []
        counts, ignored = [], set()
        for shard in shards:
            before = len(rows)
            rows += _index_shard(root / shard.name, label_names, sizes, ignored)
            counts.append(len(rows) - before)
        for extension in sorted(ignored):
            log.warning("shard members with extension %r are never read (ignored)", extension)
        keys, image, text, labels, problems = zip(*rows) if rows else ((),) * 5
        return cls(
            keys=np.asarray(keys, dtype=np.str_),
            image=np.asarray(image, dtype=np.int64).reshape(-1, 2),
            text=np.asarray(text, dtype=np.int64).reshape(-1, 2),
            labels=np.asarray(labels, dtype=np.int8).reshape(-1, len(label_names)),
            problems=np.asarray(problems, dtype=np.str_),
            label_names=np.asarray(label_names, dtype=np.str_),
            shard_samples=np.asarray(counts, dtype=np.int64),
            shard_sha256=np.asarray([shard.sha256 for shard in shards], dtype=np.str_),
        )

    @classmethod
    def of_split(cls, manifest: Manifest, split: str) -> SampleIndex:
        """The split's index, checked against the manifest (see :meth:`load`)."""
        return cls.load(
            manifest.index_path(split),
            manifest.split(split).shards,
            manifest.label_names,
            manifest.label_sizes(),
        )

    @classmethod
    def concatenate(cls, indexes: Sequence[SampleIndex]) -> SampleIndex:
        """One index of several splits' (same labels), rows in the given order."""
        if len(indexes) == 1:
            return indexes[0]
        rows = {name: np.concatenate([vars(index)[name] for index in indexes]) for name in vars(indexes[0])}
        return cls(**{**rows, "label_names": indexes[0].label_names})

    def save(self, path: Path) -> None:
        with atomic_writer(path) as handle:
            np.savez(handle, **vars(self))

    @classmethod
    def load(
        cls,
        path: Path,
        shards: Sequence[ShardInfo],
        label_names: Sequence[str],
        label_sizes: Sequence[int] | None = None,
    ) -> SampleIndex:
        """The index at ``path``, refused (:class:`ManifestError`) unless it indexes exactly
        ``shards`` (names in the manifest, same samples and sha256) with these label names, each
        column's labels in its range (``label_sizes``; None: all 0/1)."""
        try:
            with np.load(path, allow_pickle=False) as arrays:  # never unpickles
                index = cls(**{name: arrays[name] for name in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError) as err:
            raise ManifestError(f"sample index {path} cannot be read ({err}); re-pack") from None
        index._check(path, shards, list(label_names), _sizes(label_names, label_sizes))
        return index

    def _check(
        self, path: Path, shards: Sequence[ShardInfo], label_names: list[str], sizes: list[int]
    ) -> None:
        def refuse(what: str) -> ManifestError:
            return ManifestError(f"sample index {path} {what}; re-pack")

        if self.label_names.tolist() != label_names:
            raise refuse(f"has labels {self.label_names.tolist()}, the manifest {label_names}")
        if len(self.shard_samples) != len(shards):
            raise refuse(f"indexes {len(self.shard_samples)} shards, the manifest lists {len(shards)}")
        for shard, count in zip(shards, self.shard_samples.tolist()):
            if count != shard.samples:
                raise refuse(f"indexes {count} samples of {shard.name}, the manifest lists {shard.samples}")
        for shard, sha256 in zip(shards, self.shard_sha256.tolist()):
            if sha256 != shard.sha256:
                raise refuse(
                    f"was made from another {shard.name} (its sha256 is not the one the manifest lists: "
                    "the shard was rewritten after the pack)"
                )
        count = int(self.shard_samples.sum())
        shapes = (self.image.shape, self.text.shape, self.labels.shape, self.keys.shape, self.problems.shape)
        if shapes != ((count, 2), (count, 2), (count, len(label_names)), (count,), (count,)):
            raise refuse("is malformed (its arrays do not have one row per sample)")
        if ((self.labels < -1) | (self.labels >= np.asarray(sizes, dtype=np.int64))).any():
            raise refuse(
                "holds labels outside their columns' values (-1, 0 and 1, or the column's class ids)"
            )
        ends = np.repeat([shard.bytes for shard in shards], self.shard_samples)
        for member in (self.image, self.text):
            if (member < 0).any() or (member.sum(axis=1) > ends).any():
                raise refuse("points outside its shards (a shard was truncated, or the index is not theirs)")

    def __len__(self) -> int:
        return len(self.keys)

    def members(
        self, path: Path, rows: np.ndarray
    ) -> Iterator[tuple[int, ShardFile, tuple[int, int], tuple[int, int]]]:
        """(row, shard, image span, text span) of ``rows`` (all of the shard at ``path``): where to
        read each member with :meth:`ShardFile.read`, when it is needed. A file shorter than the
        members raises :class:`ShardFormatError`."""
        if not len(rows):
            return
        image, text = self.image[rows], self.text[rows]
        shard = ShardFile(path)
        if max(image.sum(axis=1).max(), text.sum(axis=1).max()) > shard.size:
            raise ShardFormatError(f"shard {path} ends inside a member (truncated); re-pack it")
        for row, image_span, text_span in zip(rows.tolist(), image.tolist(), text.tolist()):
            yield row, shard, image_span, text_span


class ShardFile:
    """A shard open for reading members at the index's offsets, with ``pread``.

    Not from a mapping of the file: a shard truncated while mapped kills the process with SIGBUS
    when a decoder touches a page past its new end. Read, a shorter file gives fewer bytes, and
    :meth:`check_unchanged` (size and modification time of the open file) tells a shard truncated
    or rewritten in place since it was opened: both raise :class:`ShardFormatError` naming it. A
    copy of a member costs a microsecond or two, against a millisecond to decode its JPEG.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with the last sample located in it
        self._fd = self._file.fileno()
        stat = os.fstat(self._fd)
        self.size, self._mtime = stat.st_size, stat.st_mtime_ns

    def read(self, span: tuple[int, int]) -> bytes:
        """The ``size`` bytes at ``offset``, for ``span`` = (offset, size)."""
        offset, size = span
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise self._changed()
        return data

    def check_unchanged(self) -> None:
        """Raise :class:`ShardFormatError` if the file was truncated or written since it was opened
        (reads made before this call then read the shard as it was opened)."""
        stat = os.fstat(self._fd)
        if (stat.st_size, stat.st_mtime_ns) != (self.size, self._mtime):
            raise self._changed()

    def _changed(self) -> ShardFormatError:
        now = os.fstat(self._fd).st_size
        return ShardFormatError(
            f"shard {self.path} changed while it was being read (it had {self.size} bytes, now {now}: "
            "truncated, rewritten or replaced in place); restore it, or re-pack the split, then resume"
        )


def _sizes(label_names: Sequence[str], label_sizes: Sequence[int] | None) -> list[int]:
    sizes = [2] * len(label_names) if label_sizes is None else list(label_sizes)
    if len(sizes) != len(label_names):
        raise ValueError(f"{len(sizes)} label sizes for {len(label_names)} label columns")
    return sizes


def _index_shard(
    path: Path, label_names: Sequence[str], sizes: Sequence[int], ignored: set[str]
) -> list[tuple[str, tuple[int, int], tuple[int, int], list[int], str]]:
    """(key, image span, text span, labels, problem) of each sample of one shard."""
    samples: list[tuple[str, dict[str, tuple[int, int]], dict[str, bytes]]] = []
    try:
        with open(path, "rb", buffering=1 << 20) as handle:
            for name, size in file_members(handle):
                key, extension = split_name(name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}, {}))
                _, spans, small = samples[-1]
                spans[extension] = (handle.tell(), size)
                if extension in ("txt", "json") and size <= MAX_MEMBER_BYTES:
                    small[extension] = read_data(handle, size)
                elif extension not in DATA_EXTENSIONS:
                    ignored.add(extension)
    except (ShardFormatError, OSError) as err:
        raise ShardFormatError(
            f"shard {path} is corrupt or truncated near sample {len(samples)} ({err}); re-pack it"
        ) from None
    return [_row(key, spans, small, label_names, sizes) for key, spans, small in samples]


def _row(
    key: str,
    spans: dict[str, tuple[int, int]],
    small: dict[str, bytes],
    label_names: Sequence[str],
    sizes: Sequence[int],
) -> tuple[str, tuple[int, int], tuple[int, int], list[int], str]:
    unlabeled = [-1] * len(label_names)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in spans), None)
    nowhere = min(spans.values())[0], 0  # a problem sample's spans: empty, and in archive order
    try:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError("member path is absolute or climbs out of the shard with '..'; refused")
        if image_ext is None:
            raise ValueError(f"no image member (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        if not 0 < spans[image_ext][1] <= MAX_MEMBER_BYTES:
            raise ValueError(f"image member is empty or over {MAX_MEMBER_BYTES >> 20} MiB")
        if "txt" not in small:
            raise ValueError(f"no txt member (or one over {MAX_MEMBER_BYTES >> 20} MiB)")
        return key, spans[image_ext], spans["txt"], _labels(small, label_names, sizes), ""
    except ValueError as problem:
        return key, nowhere, nowhere, unlabeled, str(problem)


def _labels(small: dict[str, bytes], label_names: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """All label values in ``label_names`` order, -1 where unlabeled, from the json member; each
    an int in ``[0, size)`` of its column (0/1 for a binary label)."""
    if "json" not in small:
        raise ValueError("no json member (it holds the labels)")
    try:
        labels = json.loads(small["json"]).get("labels", {})
        values = [labels.get(name, -1) for name in label_names]
    except (ValueError, AttributeError) as err:
        raise ValueError(f"json member is not a valid object ({err})") from None
    if any(isinstance(v, bool) or v not in range(-1, n) for v, n in zip(values, sizes)):
        if all(n == 2 for n in sizes):
            raise ValueError(f"labels {labels} are not all 0 or 1")
        ranges = ", ".join(f"{name} 0..{n - 1}" for name, n in zip(label_names, sizes))
        raise ValueError(f"labels {labels} are not all in their columns' ranges ({ranges})")
    return values
