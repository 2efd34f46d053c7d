"""The samples of each batch of a (rank, worker) slot: planned, located in their shards, shuffled,
cut into batches, and read when their batch is made.

Locating a sample costs nothing but its row of the sample index, so a resumed stream replays the
batches already delivered without reading them. Members are read with ``pread``
(``sample_index.ShardFile``): a shard truncated or rewritten meanwhile is a StreamError naming
it, where reading a mapping of it died of SIGBUS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from memetrain.data.epoch_plan import Segment, epoch_plan, resampled_plan
from memetrain.data.sample_index import SampleIndex, ShardFile
from memetrain.data.shard_reader import ShardFormatError
from memetrain.data.stream_error import StreamError

if TYPE_CHECKING:
    from memetrain.data.stream import StreamSettings

SHUFFLE_DRAWS = 1024

Located = tuple[int, ShardFile, tuple[int, int], tuple[int, int], bool]
"""(row in the stream's index, shard, image span, text span, pad) of a sample."""

Sample = tuple[int, bytes, bytes, bool]
"""(row in the stream's index, image bytes, text bytes, pad) of a sample read."""


class Chunk(NamedTuple):
    """One batch's located samples, and where it lies: its slot's seeds come from (epoch, slot),
    each sample's from its ``position`` in the slot's epoch."""

    samples: list[Located]
    epoch: int
    slot: int
    position: int


class SlotSamples:
    """The samples of this rank's slots, batch by batch (see the module docstring)."""

    def __init__(
        self,
        index: SampleIndex,
        shard_paths: list[Path],
        shard_positions: list[Sequence[int]],
        shard_starts: list[int],
        settings: StreamSettings,
        rank: int,
        world_size: int,
    ):
        self.index, self.shard_paths, self.shard_positions = index, shard_paths, shard_positions
        self.shard_sizes = [len(positions) for positions in shard_positions]
        self.shard_starts, self.s, self.rank, self.world_size = shard_starts, settings, rank, world_size

    def chunks(self, epoch: int, skip: int, worker: int, workers: int) -> Iterator[Chunk]:
        """The chunks of logical worker ``worker`` of ``workers`` in ``epoch`` still to deliver once
        ``skip`` batches of the epoch were."""
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
        located = self._shuffled(
            self._located(segments), np.random.default_rng([self.s.seed, epoch, slot, 1])
        )
        for index in range(batches):
            samples = [item for _, item in zip(range(self.s.batch_size), located)]
            if index >= delivered:
                yield Chunk(samples, epoch, slot, index * self.s.batch_size)

    def _located(self, segments: list[Segment]) -> Iterator[Located]:
        """Each planned sample, located: where its members lie (read only for the batches made)."""
        for segment in segments:
            path, positions = self.shard_paths[segment.shard], self.shard_positions[segment.shard]
            rows = self.shard_starts[segment.shard] + np.asarray(positions[segment.start : segment.stop])
            try:
                for row, shard, image, text in self.index.members(path, rows):
                    yield row, shard, image, text, segment.pad
            except ShardFormatError as err:
                raise StreamError(str(err)) from None
            except OSError as err:
                raise StreamError(_unreadable(path, err)) from None

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


def read(samples: list[Located]) -> list[Sample]:
    """Each located sample with its members read. A shard that changed since it was opened is a
    StreamError, checked after the reads: no batch is made of its new bytes."""
    members, shards = [], {}
    try:
        for row, shard, image, text, pad in samples:
            members.append((row, shard.read(image), shard.read(text), pad))
            shards[id(shard)] = shard
        for shard in shards.values():
            shard.check_unchanged()
    except ShardFormatError as err:
        raise StreamError(str(err)) from None
    except OSError as err:
        raise StreamError(_unreadable(shard.path, err)) from None
    return members


def _unreadable(path: Path, err: OSError) -> str:
    return f"shard {path} cannot be read ({err.strerror or err}); restore it or re-pack"
