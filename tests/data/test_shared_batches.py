"""Reused shared image buffers: a batch's images never change while anything still holds them,
whatever the consumer keeps, drops or abandons; and worker threads deliver the very batches that
worker processes do."""

from __future__ import annotations

import threading

import pytest
import torch

from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.transforms import Resize


def two_worker_stream(shards, kind: str = "process") -> MemeStream:
    # 8 per batch: each worker delivers more batches per epoch than its ring has slots
    settings = StreamSettings(batch_size=8, num_workers=2, seed=1, worker_kind=kind)
    return MemeStream(shards, "train", settings, Resize(32))


@pytest.fixture(scope="module")
def reference(synth_shards) -> list[torch.Tensor]:
    """Two epochs of images from worker processes, each copied the moment it arrives."""
    stream = two_worker_stream(synth_shards)
    assert len(stream) // 2 > stream.ring_depth
    return [batch["image"].clone() for _ in range(2) for batch in stream]


@pytest.fixture(params=["process", "thread"])
def kind(request) -> str:
    return request.param


def test_a_held_batch_never_changes_and_dropped_batches_free_their_slots(synth_shards, reference, kind):
    stream = two_worker_stream(synth_shards, kind)
    previous = None
    for index, batch in enumerate(b for _ in range(2) for b in stream):  # as the trainer: one held
        if previous is not None:
            assert torch.equal(previous["image"], reference[index - 1]), "a held batch changed"
        assert torch.equal(batch["image"], reference[index])
        previous = batch
    # once nothing holds them (as after the trainer's last step), every batch has freed its slot; the
    # main side releases when it next receives or collects, so the count is read after a collect (read
    # right after the loop it depended on when the last batches were dropped: one short, once, in CI)
    del batch, previous
    stream._returns.collect()
    assert sum(stream._released) == len(reference), "dropped batches must free their slots"


def test_kept_batches_and_views_stay_as_delivered(synth_shards, reference, kind):
    stream = two_worker_stream(synth_shards, kind)
    kept = [batch for _ in range(2) for batch in stream]
    corners = [batch["image"][0, :, :4, :4] for batch in kept]  # views outlive their batches
    expected = [corner.clone() for corner in corners]
    assert all(torch.equal(b["image"], image) for b, image in zip(kept, reference, strict=True))
    del kept
    list(stream)  # another epoch: slots are free again for everything but the views' buffers
    assert all(torch.equal(corner, copy) for corner, copy in zip(corners, expected))


def test_an_iterator_dropped_mid_epoch_leaves_later_batches_intact(synth_shards, reference, kind):
    stream = two_worker_stream(synth_shards, kind)
    threads = threading.active_count()
    iterator = iter(stream)
    assert torch.equal(next(iterator)["image"], reference[0])
    assert torch.equal(next(iterator)["image"], reference[1])
    del iterator  # its prefetched batches, in fresh buffers, are never received
    if kind == "thread":
        assert threading.active_count() == threads, "worker threads end with their iterator"
    rest = [batch["image"].clone() for _ in range(2) for batch in stream]  # resumes at batch 2
    assert all(torch.equal(image, expected) for image, expected in zip(rest, reference[2:], strict=True))
    assert all(b["image"].is_contiguous(memory_format=torch.channels_last) for b in stream)
