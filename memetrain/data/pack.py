"""Pack a source into WebDataset shards plus ``manifest.json``, a sample index per split
(``<split>.index.npz``) and ``tokenizer.json`` with each split's texts encoded by it
(``<split>.tokens.npz``).

Each sample is ``<id>.jpg|png`` (image bytes), ``<id>.txt`` (text), ``<id>.json`` (labels, split,
source, metadata) and ``<id>.cls`` (the main label; absent when unlabeled). Shards are written as
``.<name>.tmp`` and renamed when complete, and the manifest comes last, so an interrupted pack never
leaves a shard or a dataset that looks whole; a pack that fails (a full disk) removes what it wrote.
Bad memes are rejected one by one with a reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tokenizers import Tokenizer
from tqdm import tqdm

from memetrain.data import images
from memetrain.data.manifest import (
    MANIFEST_NAME,
    MAX_CLASSES,
    Manifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    file_sha256,
    label_sizes,
)
from memetrain.data.records import IMAGE_FORMATS, Entry, MemeRecord, Rejected, Source, check_id, check_text
from memetrain.data.sample_index import INDEX_SUFFIX, SampleIndex
from memetrain.data.tokenizer import TokenTable, train_wordpiece
from memetrain.errors import ConfigError, MemetrainError

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
SHARD_PATTERN = re.compile(r"^\.?[A-Za-z0-9_]+-\d{6}\.tar(\.tmp)?$")
TOKENS_SUFFIX = ".tokens.npz"
TOKENIZER_SPLITS = ("train", "unlabeled")
"""Splits whose texts train the packed tokenizer (never dev or test)."""


class PackError(MemetrainError):
    """The pack cannot go on or, under ``strict``, refused records."""


@dataclass(frozen=True)
class PackOptions:
    """How records are written; see ``configs/pack.yaml`` for what each option is for."""

    max_samples_per_shard: int = 10_000
    max_bytes_per_shard: int = 1 << 30
    resize_longest: int | None = None
    image_format: str = "keep"
    jpeg_quality: int = 95
    workers: int = 2
    strict: bool = False
    tokenizer_vocab_size: int = 8000
    overwrite: bool = False

    def content_options(self) -> dict[str, Any]:
        """The options that change what is written (a pack with the same ones need not be redone)."""
        skip = ("workers", "strict", "overwrite")
        return {name: value for name, value in vars(self).items() if name not in skip}

    def __post_init__(self) -> None:
        if self.image_format not in ("keep", "jpg", "png"):
            raise ConfigError(f"image_format={self.image_format!r}: choose keep, jpg or png")
        if self.max_samples_per_shard < 1 or self.max_bytes_per_shard < 1:
            raise ConfigError("max_samples_per_shard and max_bytes_per_shard must be at least 1")
        if self.resize_longest is not None and self.resize_longest < 8:
            raise ConfigError(
                f"resize_longest={self.resize_longest}: give a size of at least 8 pixels or null"
            )


@dataclass
class PackSummary:
    written: Counter = field(default_factory=Counter)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False

    @property
    def memes_per_second(self) -> float:
        return sum(self.written.values()) / self.seconds if self.seconds else 0.0


class _HashingFile:
    """A write-only file that counts bytes and hashes them as they pass (no second read)."""

    def __init__(self, path: Path):
        self._handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._handle.write(data)

    def close(self) -> None:
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        finally:
            self._handle.close()


class _SplitWriter:
    """Rolls ``<split>-NNNNNN.tar`` shards at a sample or byte cap; renames each when complete."""

    def __init__(self, root: Path, split: str, options: PackOptions):
        self.root, self.split, self.options = root, split, options
        self.shards: list[ShardInfo] = []
        self._file: _HashingFile | None = None
        self._tar: wds.TarWriter | None = None
        self._samples = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._samples += 1
        if (
            self._samples >= self.options.max_samples_per_shard
            or self._file.bytes >= self.options.max_bytes_per_shard
        ):
            self.close()

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = _HashingFile(self.root / f".{self._name}.tmp")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="memetrain", group="memetrain")
        self._samples = 0

    def abort(self) -> None:
        """Drop the shard being written; it never gets its final name. Never raises (closing can
        fail for the reason the pack failed, a full disk), so that every writer gets aborted."""
        if self._tar is not None:
            with suppress(OSError, ValueError):
                self._tar.close()
            with suppress(OSError, ValueError):
                self._file.close()
            (self.root / f".{self._name}.tmp").unlink(missing_ok=True)
            self._tar = self._file = None

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        os.replace(self.root / f".{self._name}.tmp", self.root / self._name)
        self.shards.append(
            ShardInfo(self._name, self._samples, self._file.bytes, self._file.sha256.hexdigest())
        )
        self._tar = self._file = None


def pack(
    source: Source, output: str | Path, options: PackOptions, source_options: dict[str, Any]
) -> PackSummary:
    """Pack every entry of ``source`` into ``output``; returns what was written and rejected."""
    root = Path(output)
    if not source.label_names:
        raise ConfigError(
            f"source {source.name} reads no label column: a pack needs at least one (label_columns=[...]); "
            "memes that are all unlabeled still need the column, with empty cells"
        )
    classes = {name: list(values) for name, values in source.label_classes.items()}
    bad = [n for n, v in classes.items() if n not in source.label_names or not 2 <= len(v) <= MAX_CLASSES]
    if bad:
        raise ConfigError(
            f"source {source.name}: class-id label columns {bad} must be label columns with 2 to {MAX_CLASSES} classes"
        )
    fingerprint = {
        "source": source.name,
        "source_options": source_options,
        "pack_options": options.content_options(),
    }
    if not options.overwrite and _already_packed(root, fingerprint):
        log.info("%s already holds this pack (same source and options); pass overwrite=true to redo it", root)
        return PackSummary(skipped=True)
    root.mkdir(parents=True, exist_ok=True)
    _remove_previous_pack(root)
    writers: dict[str, _SplitWriter] = {}
    try:
        return _write(source, root, options, fingerprint, writers)
    except BaseException as err:
        for writer in writers.values():
            writer.abort()
        _remove_previous_pack(root)  # a re-run redoes every shard anyway; a full disk gets its space back
        if isinstance(err, OSError):
            raise PackError(
                f"writing the pack to {root} failed ({err.strerror or err}); nothing was kept. Free space "
                "or choose another output, then pack again"
            ) from None
        raise


def _write(
    source: Source,
    root: Path,
    options: PackOptions,
    fingerprint: dict[str, Any],
    writers: dict[str, _SplitWriter],
) -> PackSummary:
    """Shards, tokenizer and manifest; the caller removes all of it if this fails."""
    start = time.perf_counter()
    summary = PackSummary()
    entries = _validated_entries(source, summary.rejected)
    histograms: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    unlabeled: Counter = Counter()
    texts: dict[str, list[str]] = defaultdict(list)  # per split, in manifest order
    for result in tqdm(_load_all(source, entries, options), total=len(entries), desc="pack", unit="meme"):
        if isinstance(result, Rejected):
            summary.rejected.append(result.as_dict())
            continue
        record, sample = result
        writers.setdefault(record.split, _SplitWriter(root, record.split, options)).write(sample)
        summary.written[record.split] += 1
        for name, value in record.labels.items():
            histograms[record.split][name][str(value)] += 1
        unlabeled[record.split] += not record.is_labeled
        texts[record.split].append(record.text)
    for writer in writers.values():
        writer.close()
    summary.seconds = time.perf_counter() - start

    if options.strict and summary.rejected:
        first = summary.rejected[0]
        raise PackError(
            f"strict=true and {len(summary.rejected)} record(s) were rejected (first: {first['id']}: "
            f"{first['reason']}); nothing was kept. Fix the records or pack with strict=false"
        )
    if not writers:
        raise PackError(
            f"no meme could be packed from {source.name}: all {len(summary.rejected)} were rejected"
        )

    train_texts = [text for split in TOKENIZER_SPLITS for text in texts.get(split, [])]
    tokenizer = (
        train_wordpiece(train_texts, options.tokenizer_vocab_size, root / TOKENIZER_NAME)
        if train_texts
        else None
    )
    classes = {name: list(values) for name, values in source.label_classes.items()}
    sizes = label_sizes(list(source.label_names), classes)
    manifest = Manifest(
        source=source.name,
        label_names=list(source.label_names),
        main_label=source.main_label,
        options=fingerprint,
        splits={
            split: SplitInfo(
                shards=writer.shards,
                index=_sample_index(root, split, writer.shards, source.label_names, sizes),
                label_histogram={n: dict(sorted(c.items())) for n, c in histograms[split].items()},
                unlabeled=unlabeled[split],
                tokens=_token_table(root, split, texts[split], tokenizer) if tokenizer else None,
            )
            for split, writer in sorted(writers.items())
        },
        rejected=summary.rejected,
        tokenizer=TOKENIZER_NAME if tokenizer else None,
        tokenizer_sha256=file_sha256(root / TOKENIZER_NAME) if tokenizer else None,
        label_classes=classes,
    )
    manifest.write(root)
    return summary


def _sample_index(
    root: Path, split: str, shards: list[ShardInfo], label_names: list[str], sizes: list[int]
) -> ShardInfo:
    path = root / f"{split}{INDEX_SUFFIX}"
    index = SampleIndex.from_shards(root, shards, label_names, sizes)  # their sha256 as hashed while written
    if index.shard_samples.tolist() != [shard.samples for shard in shards] or (index.problems != "").any():
        raise PackError(
            f"the shards of split {split!r} do not read back as written (a bug: please report it)"
        )
    index.save(path)
    return ShardInfo(path.name, len(index), path.stat().st_size, file_sha256(path))


def _token_table(root: Path, split: str, texts: list[str], tokenizer: Tokenizer) -> ShardInfo:
    path = root / f"{split}{TOKENS_SUFFIX}"
    TokenTable.encode(tokenizer, texts).save(path)
    return ShardInfo(path.name, len(texts), path.stat().st_size, file_sha256(path))


def _validated_entries(source: Source, rejected: list[dict[str, Any]]) -> list[Entry]:
    """Entries that pass the checks needing no image; refused ones go to ``rejected``."""
    entries, seen = [], set()
    for entry in source.entries():
        try:
            if isinstance(entry, Rejected):
                raise entry
            check_id(entry.id)
            check_text(entry.id, entry.text)
            if (entry.split, entry.id) in seen:
                raise Rejected(entry.id, f"duplicate id in split {entry.split!r}; the first one was kept")
            seen.add((entry.split, entry.id))
            entries.append(entry)
        except Rejected as err:
            err.split = err.split or getattr(entry, "split", None)
            rejected.append(err.as_dict())
    return entries


def _load_all(source: Source, entries: list[Entry], options: PackOptions) -> Iterator[Any]:
    """(record, sample) or Rejected per entry, in entry order, over ``options.workers`` processes."""
    if options.workers <= 1:
        _init_worker(source, options)
        yield from map(_load_one, entries)
        return
    with multiprocessing.Pool(options.workers, initializer=_init_worker, initargs=(source, options)) as pool:
        yield from pool.imap(_load_one, entries, chunksize=16)


_worker_state: dict[str, Any] = {}


def _init_worker(source: Source, options: PackOptions) -> None:
    _worker_state.update(source=source, options=options)


def _load_one(entry: Entry) -> tuple[MemeRecord, dict[str, Any]] | Rejected:
    source, options = _worker_state["source"], _worker_state["options"]
    try:
        record = source.load(entry)
        _check_labels(record, source)
        image_bytes, image_format = _prepared_image(record, options)
    except Rejected as err:
        err.split = err.split or entry.split
        return err
    sample = {
        "__key__": record.id,
        image_format: image_bytes,
        "txt": record.text.encode("utf-8"),
        "json": json.dumps(
            {
                "labels": dict(record.labels),
                "split": record.split,
                "source": record.source,
                "meta": dict(record.meta),
            },
            ensure_ascii=False,
        ).encode("utf-8"),
    }
    if record.is_labeled:
        sample["cls"] = str(record.labels[source.main_label]).encode()
    return record, sample


def _check_labels(record: MemeRecord, source: Source) -> None:
    """Each label is a column of the source, 0/1, or a class id of a class-id column."""
    for name, value in record.labels.items():
        if name not in source.label_names:
            raise Rejected(record.id, f"label {name!r} is not one of the source's {list(source.label_names)}")
        classes = source.label_classes.get(name)
        size = 2 if classes is None else len(classes)
        if isinstance(value, bool) or value not in range(size):
            expected = "0 or 1" if classes is None else f"a class id 0..{size - 1} of {classes}"
            raise Rejected(record.id, f"label {name!r} is {value!r}; expected {expected}")


def _prepared_image(record: MemeRecord, options: PackOptions) -> tuple[bytes, str]:
    """Verify a full decode; re-encode only when resizing or converting the format."""
    image = images.open_verified(record.id, record.image)
    target = record.image_format if options.image_format == "keep" else options.image_format
    if target not in IMAGE_FORMATS:
        target = "png"  # GIF, BMP, WebP are stored losslessly as PNG
    if options.resize_longest and max(image.size) > options.resize_longest:
        image = images.shrink(image, options.resize_longest)
    elif target == record.image_format:
        return record.image, target
    return images.encode(image, target, options.jpeg_quality), target


def _already_packed(root: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        manifest = Manifest.load(root)
        if json.loads(json.dumps(fingerprint)) != manifest.options:
            return False
        for split in manifest.splits:
            manifest.verify(split, checksums=False)
    except ManifestError:
        return False
    return True


def _remove_previous_pack(root: Path) -> None:
    """Remove what an earlier or interrupted pack left (only files with our names)."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    (root / TOKENIZER_NAME).unlink(missing_ok=True)
    for path in root.iterdir():
        if SHARD_PATTERN.match(path.name) or path.name.endswith((INDEX_SUFFIX, TOKENS_SUFFIX)):
            path.unlink()
