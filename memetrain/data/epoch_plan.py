"""Which samples each (rank, worker) slot streams in an epoch: a pure function of (seed, epoch).

The shard order is shuffled identically on every rank and the concatenated samples are cut into
one contiguous run per slot, each the same number of batches, so no rank waits on another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from memetrain.data.stream_error import StreamError


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
