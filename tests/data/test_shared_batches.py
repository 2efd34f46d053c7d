"""Reused shared image buffers: a batch's images never change while anything still holds them."""

from __future__ import annotations

import torch

from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.transforms import Resize


def two_worker_stream(shards) -> MemeStream:
    # 8 per batch: each worker delivers more batches per epoch than its ring has slots
    return MemeStream(shards, "train", StreamSettings(batch_size=8, num_workers=2, seed=1), Resize(32))


def test_kept_batches_equal_batches_dropped_as_they_come(synth_shards):
    stream = two_worker_stream(synth_shards)
    per_worker = len(stream) // 2
    assert per_worker > stream.ring_depth
    dropped = [b["image"].clone() for _ in range(2) for b in stream]  # the consumer drops each batch
    assert min(stream._released) >= 2 * per_worker - 1, "dropped batches must free their slots"

    stream = two_worker_stream(synth_shards)
    first = next(iter(stream))
    corner = first["image"][0, :, :4, :4]  # a view outlives its batch
    expected = corner.clone()
    del first
    kept = [b for _ in range(2) for b in stream]  # the consumer keeps every batch
    assert torch.equal(corner, expected)
    assert len(kept) == len(dropped) - 1  # the first epoch resumed after the batch taken above
    assert all(torch.equal(b["image"], image) for b, image in zip(kept, dropped[1:]))
    assert all(b["image"].is_contiguous(memory_format=torch.channels_last) for b in kept)
