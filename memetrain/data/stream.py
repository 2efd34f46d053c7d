"""Stream packed memes to ready batches: split by rank and worker, shuffled, decoded, resumable.

The pipeline, for one (rank, worker) "slot" and one epoch, and the module of each stage::

    plan      shard order shuffled from (seed, epoch), identical on every     epoch_plan
              rank; the concatenated samples cut into one contiguous run per
              slot, each the same number of batches
    locate    where the slot's run of samples' image and text members lie in   slot_samples
              their shards, from the split's sample index (no tar header parsed)
    shuffle   a buffer of ``shuffle_buffer`` located samples, seeded from
              (seed, epoch, slot)
    batch     ``batch_size`` samples at a time, their members then read from
              the shards (a shard truncated or rewritten meanwhile ends the
              stream with a StreamError naming it)
    decode    image and text; a bad sample is counted and logged by key, and    batch_assembly
              its row becomes a copy of the batch's first good sample (its id
              too), marked ``valid=False``: a batch keeps its size on every
              rank. The first image goes through ``decode.decode_rgb``; when it
              has the batch rows' size, the rest of the batch's JPEGs are
              decoded into their rows in one native call
    view      the view of each image, seeded from (seed, epoch, slot,
              position), written at once into its row of the batch (in a
              worker, a buffer of a ring it reuses: ``shared_batches``)
    collate   uint8 images, token ids (the pack's, padded, when the encoder is
              the packed tokenizer), labels (the index's), ``valid`` (False for
              padding in the last batch and for bad samples' rows)

Workers are DataLoader processes (``worker_kind="process"``) or threads of this process
(``"thread"``); both deliver the very same batches (``loader_workers``, ``worker_threads``).

Everything random is a pure function of the seed, the epoch and a position, so a resumed stream
replays the samples it already delivered (cheap: nothing is read or decoded) and continues with
exactly the batches an uninterrupted stream would have produced.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from memetrain.data.batch_assembly import BatchAssembler
from memetrain.data.decode import native_rows
from memetrain.data.epoch_plan import epoch_plan
from memetrain.data.loader_workers import (
    SlotDataset,
    batches_from,
    dataloader,
    keep_freed_memory,  # noqa: F401 - benchmarks/data_pipeline.py imports it from here
    worker_threads,
)
from memetrain.data.manifest import Manifest
from memetrain.data.sample_index import SampleIndex
from memetrain.data.shared_batches import TICKET, BatchReturns
from memetrain.data.slot_samples import SlotSamples
from memetrain.data.stream_error import StreamError
from memetrain.data.tokenizer import TextEncoder, TokenTable
from memetrain.data.worker_threads import WorkerThreads
from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1


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
                # the epoch cannot go on: its workers end with the loader iterator, here. Left to a
                # garbage collection (the error's traceback holds this frame), torch's shutdown
                # would find the queues to the workers closed, and wait 5 s on each of them.
                self._loader = None
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
            if self._loader is None:
                self._loader = dataloader(self._slot_dataset(), self.settings)
            return batches_from(self._loader)
        if self._threads is None:
            self._threads = worker_threads(self._slot_dataset(), self.settings)
        return iter(self._threads)

    def _slot_dataset(self) -> SlotDataset:
        """What the workers run: this rank's slots' samples, assembled into batches."""
        samples = SlotSamples(
            self.index,
            self.shard_paths,
            self.shard_positions,
            self.shard_starts,
            self.settings,
            self.rank,
            self.world_size,
        )
        assemble = BatchAssembler(self.index, self.view, self.text_encoder, self.tokens, self.settings.seed)
        return SlotDataset(
            samples,
            assemble,
            self.settings,
            epoch=self._shared_epoch,
            skip=self._shared_skip,
            released=self._released,
            mapped=self._mapped,
            ring_depth=self.ring_depth,
        )

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


@functools.cache
def _warn_without_native_rows() -> None:
    log.warning(
        "memetrain's native JPEG batch decoder was not built (libjpeg-turbo's headers were missing at "
        "install: apt-get install libjpeg62-turbo-dev, then pip install -e . again); decoding one image at a time"
    )


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
