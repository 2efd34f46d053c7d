"""Stream packed memes to ready batches: split by rank and worker, shuffled, decoded, resumable.

The pipeline, for one (rank, worker) "slot" and one epoch::

    plan      shard order shuffled from (seed, epoch), identical on every rank; the concatenated
              samples cut into one contiguous run per slot, each the same number of batches
    read      the slot's run of samples' image and text members: views of the mapped shard at
              the offsets in the split's sample index (no tar header parsed, nothing copied)
    shuffle   a buffer of ``shuffle_buffer`` raw samples, seeded from (seed, epoch, slot)
    batch     ``batch_size`` raw samples at a time
    decode    image and text; a bad sample is counted and dropped. The first image goes through
              ``decode.decode_rgb``; when it has the batch rows' size, the rest of the batch's
              JPEGs are decoded into their rows in one native call (``decode.decode_jpeg_rows``)
    view      the view of each image, seeded from (seed, epoch, slot, position), written at once
              into its row of the batch (in a worker, a buffer of a ring it reuses: ``shared_batches``)
    collate   uint8 images, token ids (the pack's, padded, when the encoder is the packed
              tokenizer), labels (the index's), ``valid`` (False for padding in the last batch)

Workers are DataLoader processes (``worker_kind="process"``) or threads of this process
(``"thread"``, :mod:`memetrain.data.worker_threads`); both deliver the very same batches.

Everything random is a pure function of the seed, the epoch and a position, so a resumed stream
replays the raw samples it already delivered (cheap: nothing is decoded) and continues with
exactly the batches an uninterrupted stream would have produced.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import itertools
import logging
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memetrain.data.decode import (
    STORE_ALIGNMENT,
    BadSample,
    Row,
    SampleDecoder,
    cached_rows,
    decode_jpeg_rows,
    native_rows,
)
from memetrain.data.manifest import Manifest
from memetrain.data.sample_index import SampleIndex
from memetrain.data.shard_reader import ShardFormatError
from memetrain.data.shared_batches import TICKET, BatchReturns, SharedBatches
from memetrain.data.tokenizer import TextEncoder, TokenTable
from memetrain.data.worker_threads import WorkerThreads
from memetrain.errors import ConfigError, MemetrainError

log = logging.getLogger(__name__)

STATE_VERSION = 1
SHUFFLE_DRAWS = 1024
STOP_GRACE_SECONDS = 60  # a loader worker outlives SIGTERM / SIGUSR2 this long (see _outlive_stop_signals)


class StreamError(MemetrainError):
    """The stream cannot go on: a corrupt shard, too many bad samples, or an impossible plan."""


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of shard ``shard``; ``pad`` marks repeats that fill the last batch."""

    shard: int
    start: int
    stop: int
    pad: bool = False


def epoch_plan(
    shard_sizes: list[int], slots: int, batch_size: int, seed: int, epoch: int, shuffle: bool, drop_last: bool
) -> tuple[int, list[list[Segment]]]:
    """Batches per slot and each slot's segments for one epoch (``exact`` mode).

    Every slot gets the same number of batches ``b`` so no rank waits on another. Without
    ``drop_last`` every sample appears once; when fewer than ``slots`` samples are left for the
    last batches, the slots that would get none repeat a sample marked ``pad`` instead.
    With ``drop_last`` each slot gets ``b`` full batches and the rest of the epoch is skipped.
    """
    total = sum(shard_sizes)
    order = np.arange(len(shard_sizes))
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0]).permutation(len(shard_sizes))
    if drop_last:
        batches = total // (slots * batch_size)
        counts = [batches * batch_size] * slots
    else:
        batches = math.ceil(total / (slots * batch_size))
        last = total - slots * (batches - 1) * batch_size
        counts = [
            (batches - 1) * batch_size + max(1, last // slots + (k < last % slots)) for k in range(slots)
        ]
    if batches == 0:
        raise StreamError(
            f"{total} samples cannot fill one batch of {batch_size} on each of {slots} rank x worker slots; "
            "lower the batch size or the number of workers, or pack more data"
        )
    sequence = [(int(s), 0, shard_sizes[s]) for s in order if shard_sizes[s]]
    plans, cursor = [], 0
    for count in counts:
        real = min(count, total - cursor) if count else 0
        plans.append(_take(sequence, cursor, real) + _take(sequence, 0, count - real, pad=True))
        cursor += real
    return batches, plans


def _take(sequence: list[tuple[int, int, int]], begin: int, count: int, pad: bool = False) -> list[Segment]:
    """Segments for samples ``[begin, begin + count)`` of the concatenated shard sequence."""
    segments, offset = [], 0
    for shard, _, size in sequence:
        lo, hi = max(begin, offset), min(begin + count, offset + size)
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset, pad))
        offset += size
        if offset >= begin + count:
            break
    return segments


def resampled_plan(
    shard_sizes: list[int], slots: int, batch_size: int, seed: int, epoch: int, slot: int
) -> tuple[int, list[Segment]]:
    """``resampled`` mode: whole shards drawn with replacement, a nominal epoch of batches per slot."""
    total = sum(shard_sizes)
    batches = max(1, total // (slots * batch_size))
    rng = np.random.default_rng([seed, epoch, slot, 2])
    segments, planned = [], 0
    while planned < batches * batch_size:
        shard = int(rng.integers(len(shard_sizes)))
        take = min(shard_sizes[shard], batches * batch_size - planned)
        segments.append(Segment(shard, 0, take))
        planned += take
    return batches, segments


class _SlotDataset(IterableDataset):
    """The per-(rank, worker) pipeline; the main process drives it through :class:`MemeStream`."""

    def __init__(self, stream: MemeStream):
        self.shard_paths, self.shard_positions = stream.shard_paths, stream.shard_positions
        self.shard_sizes = stream.shard_sizes
        self.s = stream.settings
        self.rank, self.world_size = stream.rank, stream.world_size
        self.decoder = SampleDecoder(stream.view.decode_size)
        self.view, self.text_encoder, self.tokens = stream.view, stream.text_encoder, stream.tokens
        self.index, self.keys = stream.index, stream.index.keys.tolist()
        self.problems = {
            int(row): str(stream.index.problems[row]) for row in np.flatnonzero(stream.index.problems != "")
        }
        self.shard_starts = stream.shard_starts
        self.epoch, self.skip = stream._shared_epoch, stream._shared_skip
        self.released, self.mapped, self.ring_depth = stream._released, stream._mapped, stream.ring_depth
        self.shared: SharedBatches | None = None  # made in each worker process

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The batches of one epoch in a loader worker process (or in this process, without workers)."""
        info = get_worker_info()
        if info is not None and self.shared is None:  # the first epoch in this worker process
            # What the worker inherited (torch, the dataset: ~340k objects) lives as long as it does;
            # frozen, full garbage collections stop scanning it (they took a tenth of a worker's time).
            gc.freeze()
            by_reference = not self.s.pin_memory  # the loader pins tensors, not references
            self.shared = SharedBatches(self.released, self.mapped, info.id, self.ring_depth, by_reference)
        try:
            yield from self.batches(info.id if info else 0, info.num_workers if info else 1, self.shared)
        except MemetrainError as err:
            # Raised in a loader worker, it would reach the main process as a traceback in text;
            # sent as an item it arrives whole, and MemeStream raises it there as the error it is.
            yield {"error": err}

    def batches(self, worker_id: int, workers: int, shared: SharedBatches | None) -> Iterator[dict[str, Any]]:
        """Loader worker ``worker_id`` of ``workers``'s batches of the current epoch, images written
        into ``shared`` (None: fresh tensors)."""
        # The loader takes batch t from worker t % workers, starting at worker 0; after ``skip``
        # batches the next one is due from logical worker skip % workers, so rotate the ids.
        worker = (worker_id + self.skip.value) % workers
        bad = 0
        for chunk in self._chunks(worker, workers):
            batch, dropped = self._batch(*chunk, shared)
            bad = self._count_bad(bad + dropped, worker)
            yield batch

    def tasks(self, workers: int) -> Iterator[Callable[[SharedBatches], dict[str, Any]]]:
        """The current epoch's batches still to deliver, in the order a loader with ``workers``
        workers delivers them, as tasks that any thread can run with its own ring of buffers."""
        skip, lock = self.skip.value, threading.Lock()
        chunks = [self._chunks(worker, workers) for worker in range(workers)]
        bad = [0] * workers

        def make(chunk: tuple, worker: int, ring: SharedBatches) -> dict[str, Any]:
            batch, dropped = self._batch(*chunk, ring)
            with lock:
                bad[worker] = self._count_bad(bad[worker] + dropped, worker)
            return batch

        for delivered in itertools.count(skip):
            worker = delivered % workers
            chunk = next(chunks[worker], None)
            if chunk is None:  # every worker has the same number of batches
                return
            yield functools.partial(make, chunk, worker)

    def _chunks(self, worker: int, workers: int) -> Iterator[tuple[list, int, int, int]]:
        """(raw samples, epoch, slot, position) of each batch of logical worker ``worker`` of
        ``workers`` still to deliver this epoch."""
        epoch, skip = self.epoch.value, self.skip.value
        slot, slots = self.rank * workers + worker, self.world_size * workers
        delivered = len(range(worker, skip, workers))  # this worker's share of the batches already consumed
        if self.s.mode == "exact":
            batches, plans = epoch_plan(
                self.shard_sizes,
                slots,
                self.s.batch_size,
                self.s.seed,
                epoch,
                self.s.shuffle,
                self.s.drop_last,
            )
            segments = plans[slot]
        else:
            batches, segments = resampled_plan(
                self.shard_sizes, slots, self.s.batch_size, self.s.seed, epoch, slot
            )
        raw = self._shuffled(self._read(segments), np.random.default_rng([self.s.seed, epoch, slot, 1]))
        for index in range(batches):
            chunk = [item for _, item in zip(range(self.s.batch_size), raw)]
            if index >= delivered:
                yield chunk, epoch, slot, index * self.s.batch_size

    def _count_bad(self, bad: int, worker: int) -> int:
        if bad > self.s.max_bad_samples:
            raise StreamError(
                f"{bad} bad samples on rank {self.rank} worker {worker}, over max_bad_samples="
                f"{self.s.max_bad_samples} (see the warnings above for which); fix or re-pack the shards"
            )
        return bad

    def _read(self, segments: list[Segment]) -> Iterator[tuple[int, memoryview, memoryview, bool]]:
        """(row in the stream's index, image bytes, text bytes, pad) of each planned sample."""
        for segment in segments:
            path, positions = self.shard_paths[segment.shard], self.shard_positions[segment.shard]
            rows = self.shard_starts[segment.shard] + np.asarray(positions[segment.start : segment.stop])
            try:
                for row, image, text in self.index.read(path, rows):
                    yield row, image, text, segment.pad
            except ShardFormatError as err:
                raise StreamError(str(err)) from None
            except OSError as err:
                raise StreamError(
                    f"shard {path} cannot be read ({err.strerror or err}); restore it or re-pack"
                ) from None

    def _shuffled(self, items: Iterator, rng: np.random.Generator) -> Iterator:
        if not self.s.shuffle or self.s.shuffle_buffer <= 1:
            yield from items
            return
        buffer, size = [], self.s.shuffle_buffer
        picks = iter(())
        for item in items:
            if len(buffer) < size:
                buffer.append(item)
                continue
            pick = next(picks, None)
            if pick is None:  # drawn a block at a time: one draw per sample cost 3 µs
                picks = iter(rng.integers(size, size=SHUFFLE_DRAWS).tolist())
                pick = next(picks)
            buffer[pick], item = item, buffer[pick]
            yield item
        for pick in rng.permutation(len(buffer)):
            yield buffer[pick]

    def _batch(
        self, chunk: list, epoch: int, slot: int, position: int, shared: SharedBatches | None
    ) -> tuple[dict[str, Any], int]:
        rows, keys, texts, valid, dropped = [], [], [], [], 0
        if shared is not None:
            shared.start()
        images = _BatchImages(len(chunk), shared)
        passed_through = False  # natively decoded rows are the view itself: the view need not be called
        for offset, (row, image_bytes, text_bytes, pad) in enumerate(chunk):
            key = self.keys[row]
            if images.rest_in_rows:  # the rest of the batch's JPEGs in one native call
                images.decode_rows([sample[1] for sample in chunk[offset:]], first=offset)
                passed_through = not self.view.random and _passes_through(self.view, *images.row_size)
            try:
                if row in self.problems:
                    raise BadSample(key, self.problems[row])
                text = self.decoder.text(key, text_bytes)
                taken = passed_through and images.take_decoded(offset)
                if not taken:
                    image = images.decoded(offset)
                    if image is None:
                        image = self.decoder.image(key, image_bytes, images.next_row())
            except BadSample as bad:
                log.warning("skipping bad %s", bad)
                dropped += 1
                continue
            if not taken:
                # seeding a generator costs a third of a JPEG decode: only views that draw get one
                rng = (
                    np.random.default_rng([self.s.seed, epoch, slot, position + offset])
                    if self.view.random
                    else None
                )
                images.add(key, self.view(image, rng), image)
            rows.append(row)
            keys.append(key)
            texts.append(text)
            valid.append(not pad)
        if not keys:
            raise StreamError(
                f"every sample of a batch was bad (first: {self.keys[chunk[0][0]]!r}); the shards need fixing"
            )
        batch: dict[str, Any] = {"id": keys, "text": texts, "bad_samples": dropped}
        batch.update(images.batched())
        if shared is not None:
            shared.finish(batch)
        # small arrays stay numpy until the main process (see _small_tensors)
        batch["labels"] = self.index.labels[rows].astype(np.int64)
        batch["valid"] = np.asarray(valid, dtype=bool)
        if self.tokens is not None:
            batch["input_ids"], batch["attention_mask"] = self.text_encoder.pad(self.tokens, rows)
        elif self.text_encoder is not None:
            batch["input_ids"], batch["attention_mask"] = self.text_encoder(texts)
        return batch, dropped


class _BatchImages:
    """A batch's images, each written into its row of the batch tensor as soon as its view is
    made, while it is still in the CPU's cache (in a worker, straight into the shared buffer that
    carries it to the main process). Rows are HWC, so the batch is channels last and each write a
    plain copy. Once the batch's image size is known, :meth:`next_row` offers the next row to the
    decoder: an image of that very size is decoded into it, and a view that returns it unchanged
    (``Resize`` of an image packed at the view's size) costs no copy and no check. When the first
    image had the rows' size, :meth:`decode_rows` decodes the rest of the batch's JPEGs into
    their rows in one native call."""

    def __init__(self, capacity: int, shared: SharedBatches | None):
        self.capacity, self.shared = capacity, shared
        self.count, self.multi_view = 0, False
        self._buffers: list[torch.Tensor] = []  # per view of a sample: [capacity, H, W, C]
        self._rows: np.ndarray | None = None  # a single uint8 view's buffer, as numpy, once made
        self._pixels: list[np.ndarray] = []  # its rows, made when first asked for (see _row_views)
        self._images: tuple[torch.Tensor, ...] = ()  # the same rows as [C, H, W] tensors
        self.rest_in_rows = False  # the first image had the rows' size, and decode_rows is still to come
        self._statuses, self._first, self._first_row = b"", 0, 0  # of decode_rows

    @property
    def row_size(self) -> tuple[int, int]:
        return self._rows.shape[1:3]

    def next_row(self) -> Row | None:
        if self._rows is None:
            return None
        self._row_views()
        return Row(self._pixels[self.count], self._images[self.count])

    def decode_rows(self, images: list[memoryview], first: int) -> None:
        """Decode ``images``, the batch's samples from ``first`` on, into the rows from the next
        one on (see :meth:`take_decoded`); without the native decoder, nothing."""
        statuses = decode_jpeg_rows(images, self._rows[self.count : self.count + len(images)])
        self._statuses, self._first, self._first_row = statuses or b"", first, self.count
        self.rest_in_rows = False

    def take_decoded(self, sample: int) -> bool:
        """Whether :meth:`decode_rows` decoded the batch's sample ``sample``; if so its image,
        which needs no view, is taken as the next row."""
        if not self._in_next_row(sample):
            return False
        self.count += 1
        return True

    def decoded(self, sample: int) -> torch.Tensor | None:
        """The image of sample ``sample`` if :meth:`decode_rows` decoded it, in the next row, for
        its view to be made (None: it must be decoded)."""
        if not self._in_next_row(sample):
            return None
        self._row_views()
        return self._images[self.count]

    def _in_next_row(self, sample: int) -> bool:
        """Whether sample ``sample`` was decoded by :meth:`decode_rows`; if so, it is moved into
        the next row when samples before it were dropped."""
        at = sample - self._first
        if not 0 <= at < len(self._statuses) or not self._statuses[at]:
            return False
        if self._first_row + at != self.count:
            self._rows[self.count] = self._rows[self._first_row + at]
        return True

    def add(self, key: str, view: torch.Tensor | list[torch.Tensor], decoded: torch.Tensor) -> None:
        """Write the ``view`` made of image ``decoded`` into the next row."""
        if self._images and view is self._images[self.count]:
            self.count += 1  # decoded into its row and passed through unchanged
            return
        images = view if isinstance(view, list) else [view]
        if not self._buffers:
            self.multi_view = isinstance(view, list)
            self._buffers = [self._empty(image) for image in images]
            if not self.multi_view and view.dtype == torch.uint8:
                self._rows = self._buffers[0].numpy()
                self.rest_in_rows = decoded.shape == view.shape
        for index, (buffer, image) in enumerate(zip(self._buffers, images, strict=True)):
            row, hwc = buffer[self.count], image.permute(1, 2, 0)
            if hwc.shape != row.shape or image.dtype != row.dtype:
                which = f"image {index} of its views" if self.multi_view else "image"
                raise StreamError(
                    f"the view made a {tuple(image.shape)} {image.dtype} {which} of sample {key!r}, unlike "
                    f"the {tuple(buffer[0].permute(2, 0, 1).shape)} {buffer.dtype} of the batch's first "
                    "sample: a view must give every image one size and dtype"
                )
            if hwc.data_ptr() == row.data_ptr() and hwc.stride() == row.stride():
                continue  # decoded into the row, passed through unchanged
            if hwc.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                hwc = hwc.clone()  # a view of the row itself (say, transposed) would be overwritten as read
            if self._rows is not None:
                np.copyto(self._rows[self.count], hwc.numpy())  # numpy's copy: no intra-op threads
            else:
                row.copy_(hwc)
        self.count += 1

    def _row_views(self) -> None:
        """Each row as numpy HWC and as a [C, H, W] tensor (128 objects: made only when needed)."""
        if not self._images:
            self._pixels = list(self._rows)
            self._images = self._buffers[0].permute(0, 3, 1, 2).unbind(0)

    def _empty(self, image: torch.Tensor) -> torch.Tensor:
        channels, height, width = image.shape
        shape = (self.capacity, height, width, channels)
        if self.shared is not None:
            return self.shared.empty(shape, image.dtype)
        if image.dtype != torch.uint8:
            return torch.empty(shape, dtype=image.dtype)
        return cached_rows(
            torch.empty(math.prod(shape) + STORE_ALIGNMENT, dtype=torch.uint8).untyped_storage(), shape
        )

    def batched(self) -> dict[str, Any]:
        """``image`` (or ``views``): ``[B, C, H, W]`` of the rows written, channels-last memory."""
        tensors = [buffer[: self.count].permute(0, 3, 1, 2) for buffer in self._buffers]
        return {"views": tensors} if self.multi_view else {"image": tensors[0]}


@dataclass(frozen=True)
class StreamSettings:
    """How a split is streamed; ``configs/data/*.yaml`` documents every field."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    mode: str = "exact"
    drop_last: bool = False
    num_workers: int = 2
    worker_kind: str = "process"
    prefetch_factor: int = 4
    pin_memory: bool = False
    max_bad_samples: int = 10
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "resampled"):
            raise ConfigError(f"stream mode {self.mode!r}: choose exact or resampled")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be at least 1")
        if self.worker_kind not in ("process", "thread"):
            raise ConfigError(f"worker_kind={self.worker_kind!r}: choose process or thread")


class MemeStream:
    """Batches of one split (or of several, as one: ``["train", "unlabeled"]``) for this rank;
    iterate it once per epoch. ``subset`` indexes the samples split-wide, in manifest order.

    ``state_dict()`` records the epoch and the batches delivered so far; a new stream given that
    state continues exactly where this one stopped (same world size and workers required).
    """

    def __init__(
        self,
        shards: str | Path,
        split: str | Sequence[str],
        settings: StreamSettings,
        view: Callable,
        text_encoder: TextEncoder | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        subset: Sequence[int] | None = None,
    ):
        self.manifest = Manifest.load(shards)
        splits = [split] if isinstance(split, str) else list(split)
        self.split = "+".join(splits)
        for name in splits:
            self.manifest.verify(name, checksums=settings.verify_checksums)
        shard_infos = [shard for name in splits for shard in self.manifest.split(name).shards]
        self.shard_starts = np.cumsum([0] + [shard.samples for shard in shard_infos[:-1]]).tolist()
        self.index = SampleIndex.concatenate([SampleIndex.of_split(self.manifest, name) for name in splits])
        self.tokens = _packed_tokens(self.manifest, splits, text_encoder)
        self.shard_paths = [self.manifest.shard_path(shard) for shard in shard_infos]
        self.shard_positions = _positions_per_shard([shard.samples for shard in shard_infos], subset)
        self.shard_sizes = [len(positions) for positions in self.shard_positions]
        self.num_samples = sum(self.shard_sizes)
        self.subset_digest = (
            None if subset is None else hashlib.sha256(np.ascontiguousarray(subset, np.int64)).hexdigest()
        )
        self.shards_digest = hashlib.sha256(
            " ".join(shard.sha256 for shard in shard_infos).encode()
        ).hexdigest()
        self.settings, self.view, self.text_encoder = settings, view, text_encoder
        if not native_rows():
            _warn_without_native_rows()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = world_size or (torch.distributed.get_world_size() if distributed else 1)
        self.epoch, self.batches_done, self.bad_samples = 0, 0, 0
        self.main_index = self.manifest.label_names.index(self.manifest.main_label)
        self._shared_epoch = multiprocessing.Value("q", 0)
        self._shared_skip = multiprocessing.Value("q", 0)
        self._released = multiprocessing.RawArray("q", max(1, settings.num_workers))
        self._mapped = multiprocessing.RawArray("q", max(1, settings.num_workers) * self.ring_depth)
        self._returns = BatchReturns(self._released, self._mapped, self.ring_depth)
        self._loader: DataLoader | None = None
        self._threads: WorkerThreads | None = None

    @property
    def ring_depth(self) -> int:
        """Shared image buffers per worker: the batches a worker may have in flight (prefetched),
        plus those the consumer may still hold while asking for the next (the current one, and one
        being logged or moved)."""
        return self.settings.prefetch_factor + 3

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.settings.num_workers)

    def __len__(self) -> int:
        """Batches this rank delivers per epoch."""
        s = self.settings
        if s.mode == "exact":
            batches, _ = epoch_plan(self.shard_sizes, self.slots, s.batch_size, s.seed, 0, False, s.drop_last)
        else:
            batches = max(1, self.num_samples // (self.slots * s.batch_size))
        return batches * max(1, s.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._shared_epoch.value, self._shared_skip.value = self.epoch, self.batches_done
        self._returns.collect()  # before the workers start prefetching: last epoch's batches are done
        for batch in self._worker_batches():
            if "error" in batch:
                raise batch["error"]
            self.batches_done += 1
            self.bad_samples += batch.pop("bad_samples")
            if TICKET in batch:
                batch = self._returns.receive(batch)
            yield self._small_tensors(batch)
            self._returns.collect()  # the consumer is back: the batches it dropped free their slots
        self.epoch, self.batches_done = self.epoch + 1, 0

    def _small_tensors(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Labels, ``valid`` and token ids as tensors. A worker sends them as numpy arrays, inside
        the pickled batch: as tensors each would cross in its own shared-memory segment, at the
        cost of a file-descriptor handshake (a socket connection) apiece."""
        for name in ("labels", "valid", "input_ids", "attention_mask"):
            if name in batch:
                batch[name] = torch.from_numpy(batch[name])
        batch["label"] = batch["labels"][:, self.main_index]
        return batch

    def _worker_batches(self) -> Iterator[dict[str, Any]]:
        if self.settings.worker_kind == "process" or self.settings.num_workers == 0:
            return _batches_from(self._dataloader())
        if self._threads is None:
            self._threads = _worker_threads(_SlotDataset(self), self.settings)
        return iter(self._threads)

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            s = self.settings
            workers = s.num_workers > 0
            self._loader = DataLoader(
                _SlotDataset(self),
                batch_size=None,
                num_workers=s.num_workers,
                pin_memory=s.pin_memory,
                persistent_workers=workers,
                prefetch_factor=s.prefetch_factor if workers else None,
                collate_fn=_as_sent,
                # its own generator: creating an iterator must not draw from the global torch RNG,
                # or a resumed run's dropout would differ from an uninterrupted one's
                generator=torch.Generator().manual_seed(s.seed),
                worker_init_fn=_init_worker,
            )
        return self._loader

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "bad_samples": self.bad_samples,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.settings.num_workers,
            "batch_size": self.settings.batch_size,
            "seed": self.settings.seed,
            "subset": self.subset_digest,
            "shards": self.shards_digest,
            "tokenizer": self.text_encoder.sha256 if self.text_encoder else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StreamError(
                f"stream state version {state.get('version')} is not {STATE_VERSION}; cannot resume"
            )
        expected = self.state_dict()
        for name in ("split", "world_size", "num_workers", "batch_size", "seed", "subset"):
            if state[name] != expected[name]:
                raise StreamError(
                    f"cannot resume the stream: it was saved with {name}={state[name]!r} and now runs with "
                    f"{name}={expected[name]!r}; resume with the same value (the sample order depends on it)"
                )
        for name, what in _PACK_IDENTITY.items():
            if name in state and state[name] != expected[name]:  # states from before they were kept lack them
                raise StreamError(f"cannot resume the stream: {what}; resume with those, or start a new run")
        self.epoch, self.batches_done, self.bad_samples = (
            state["epoch"],
            state["batches_done"],
            state["bad_samples"],
        )


_PACK_IDENTITY = {
    "shards": "the split's shards are not the ones the checkpoint was trained on (another sha256)",
    "tokenizer": "the tokenizer file is not the one the checkpoint was trained with (another sha256; a re-pack "
    "trains a new tokenizer, as WordPiece training is not deterministic, and the same ids would mean other words)",
}
"""What a stream's state records of its data, so that a run never resumes on other data."""


def _as_sent(batch: dict[str, Any]) -> dict[str, Any]:
    """The loader's collate function: batches are made by the slot dataset, numpy arrays kept."""
    return batch


STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR2}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _batches_from(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """``iter(loader)`` with the stop signals blocked while it forks the workers: a forked worker
    keeps its parent thread's signal mask, so it holds them from its first instruction, before
    torch installs its own SIGTERM handler, and its signal thread (:func:`_outlive_stop_signals`)
    takes any sent meanwhile. The parent gets its pending ones when the mask is restored."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return batches


@functools.cache
def _warn_without_native_rows() -> None:
    log.warning(
        "memetrain's native JPEG batch decoder was not built (libjpeg-turbo's headers were missing at "
        "install: apt-get install libjpeg62-turbo-dev, then pip install -e . again); decoding one image at a time"
    )


def _passes_through(view: Callable, height: int, width: int) -> bool:
    """Whether ``view`` says it returns an image of this size unchanged (``Resize.passes_through``)."""
    passes_through = getattr(view, "passes_through", None)
    return passes_through is not None and passes_through(height, width)


def _worker_threads(dataset: _SlotDataset, settings: StreamSettings) -> WorkerThreads:
    """Worker threads, each with its own ring of image buffers (reused once the consumer is done
    with a batch, as in worker processes); with ``pin_memory``, each batch's images are copied to
    pinned memory in the worker thread (where a DataLoader has a thread of its own for it)."""
    workers = settings.num_workers
    rings = [
        SharedBatches(dataset.released, dataset.mapped, thread, dataset.ring_depth, by_reference=False)
        for thread in range(workers)
    ]
    pin = settings.pin_memory and torch.cuda.is_available()

    def run(task: Callable[[SharedBatches], dict[str, Any]], thread: int) -> dict[str, Any]:
        batch = task(rings[thread])
        return _pinned(batch) if pin else batch

    return WorkerThreads(lambda: dataset.tasks(workers), run, workers, settings.prefetch_factor * workers)


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    for key in ("image", "views"):
        if key in batch:
            value = batch[key]
            batch[key] = [view.pin_memory() for view in value] if key == "views" else value.pin_memory()
    return batch


def _init_worker(worker_id: int) -> None:
    _outlive_stop_signals()
    keep_freed_memory()
    # the workers are the parallelism: a tokenizer's own threads would only compete with them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def keep_freed_memory() -> None:
    """Raise glibc's thresholds for handing freed memory back to the kernel. By default an
    allocation over 128 KiB (one decoded 224 px image) gets its own mapping, and the heap is
    trimmed whenever its free top passes twice that; a worker allocates and frees the same few
    megabytes for every batch, so the kernel faulted in and zeroed their pages anew each time
    (9 faults per sample). Kept, the pages are reused: a worker holds at most the trim threshold
    of freed memory. Other C libraries have no ``mallopt`` and are left as they are."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def _outlive_stop_signals() -> None:
    """Slurm signals every process of a job (SIGTERM on preemption, SIGUSR2 before its time limit),
    and the training checkpoints after its current step, for which it may still need batches: a
    worker so signalled keeps serving for STOP_GRACE_SECONDS, then SIGALRM ends it (torch's own
    SIGTERM handler would end it at once and fail the step). A SIGTERM from the worker's own
    parent (multiprocessing ending its children at exit) still ends it at once, or an exiting
    training would wait out the grace and die on a worker killed by SIGALRM. Only the signal's
    sender tells the two apart, so a thread takes the signals with ``sigwaitinfo``; every thread
    of the worker blocks them (see :func:`_batches_from`)."""
    parent = os.getppid()

    def take_signals() -> None:
        while True:
            received = signal.sigwaitinfo(STOP_SIGNALS)
            if received.si_pid == parent and received.si_signo == signal.SIGTERM:
                os._exit(0)
            signal.alarm(STOP_GRACE_SECONDS)

    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already so when forked by _batches_from
    threading.Thread(target=take_signals, name="stop-signals", daemon=True).start()


def _packed_tokens(manifest: Manifest, splits: list[str], encoder: TextEncoder | None) -> TokenTable | None:
    """The splits' texts as the pack encoded them, when ``encoder`` would encode them the same:
    it is the packed tokenizer file itself (same sha256) and does not clean the texts."""
    if (
        encoder is None
        or encoder.clean
        or encoder.sha256 is None
        or encoder.sha256 != manifest.tokenizer_sha256
    ):
        return None
    paths = [manifest.tokens_path(split) for split in splits]
    if None in paths:
        return None
    tables = [TokenTable.load(path) for path in paths]
    for split, table in zip(splits, tables):
        if len(table) != manifest.split(split).samples:
            raise StreamError(
                f"the token table of split {split!r} has {len(table)} rows for its "
                f"{manifest.split(split).samples} samples; re-pack"
            )
    return tables[0] if len(tables) == 1 else TokenTable.concatenate(tables)


def _positions_per_shard(sizes: list[int], subset: Sequence[int] | None) -> list[Sequence[int]]:
    """Per shard, the sample positions streamed: all of them, or those whose split-wide index
    (shards in manifest order) is in ``subset``."""
    if subset is None:
        return [range(size) for size in sizes]
    chosen = np.unique(np.asarray(subset, dtype=np.int64))
    if len(chosen) and (chosen[0] < 0 or chosen[-1] >= sum(sizes)):
        raise StreamError(f"subset indices must lie in [0, {sum(sizes)}) for this split")
    bounds = np.cumsum([0, *sizes])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_labels(shards: str | Path, split: str) -> np.ndarray:
    """Labels ``[N, K]`` (-1 unlabeled) of a split, in manifest order, from its sample index.

    The row index is the split-wide sample index that ``MemeStream(subset=...)`` takes.
    """
    return SampleIndex.of_split(Manifest.load(shards), split).labels.astype(np.int64)
