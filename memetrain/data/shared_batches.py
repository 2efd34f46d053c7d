"""Image batches handed from a loader worker to the main process through reused shared memory.

A batch of 64 images at 224 px is 9.6 MB. When a worker returns a tensor, torch moves it into
fresh shared memory, whose pages the kernel faults in and zeroes, passes its file descriptor over
a socket handshake, and the main process maps it anew: at 224 px that took a fifth of a worker's
time. Here each worker writes its batches' images into a ring of shared buffers (one slot per
batch in flight) and reuses a slot once the main process has released it. The main process keeps
every buffer it has seen mapped, so a batch in a reused slot crosses as a reference to the
buffer (:class:`SlotImage`: index, shape, strides), without a descriptor or a new mapping.

The main process releases a batch when nothing references its images any more (the consumer
dropped the batch and every view of it), in order, by advancing a counter per worker
(``released``). A worker writes into a slot only when the counter shows it was released, so a
buffer is never overwritten while anything may still read it; when no slot is free (a consumer
that keeps batches, an iterator dropped mid-epoch) it takes fresh shared memory, as torch would.
A slot's buffers are sent by reference only once the main process has recorded (``mapped``) that
it holds that very generation of them; otherwise they go as tensors, as torch sends them.

Worker threads (``worker_kind="thread"``) use the same ring, release rule and all: their batches
are tensors of this process already, and reused buffers spare them fresh memory's page faults.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import torch

from memetrain.data.decode import STORE_ALIGNMENT, cached_rows

TICKET = "shared_batch"
"""Batch key of (worker, sequence number, slot generation): which buffers carry the images."""

_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""References to a storage (private torch API); without it no slot is ever reused (always correct)."""


@dataclass(frozen=True)
class SlotImage:
    """An image tensor in the ring slot named by the batch's ticket: its buffer, storage offset, shape
    and strides."""

    index: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class SharedBatches:
    """Worker side: the shared buffers of the last ``depth`` batches this worker process produced.

    ``by_reference``: send reused buffers as :class:`SlotImage` (not with pinned memory, whose
    copy the loader makes from tensors only)."""

    def __init__(self, released: Any, mapped: Any, worker: int, depth: int, by_reference: bool):
        self.released, self.mapped, self.worker, self.depth = released, mapped, worker, depth
        self.by_reference = by_reference
        released[worker] = 0  # a new worker process: nothing of its own is in flight yet
        mapped[worker * depth : (worker + 1) * depth] = [0] * depth
        self.sequence = 0
        self._slots: list[list[torch.UntypedStorage]] = [[] for _ in range(depth)]
        self._generations = [0] * depth  # bumped whenever a slot gets a fresh buffer
        self._slot_index, self._reuse, self._used, self._fresh = 0, False, 0, False

    def start(self) -> None:
        """Begin the next batch."""
        self._slot_index = self.sequence % self.depth
        self._reuse = self.released[self.worker] > self.sequence - self.depth  # the slot's last batch is free
        self._used, self._fresh = 0, False

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in shared memory for the current batch (uint8: where
        JPEG rows decoded into it are written through the cache, see ``decode.cached_rows``)."""
        slot, nbytes = self._slots[self._slot_index], math.prod(shape) * dtype.itemsize + STORE_ALIGNMENT
        index, self._used = self._used, self._used + 1
        if self._reuse and index < len(slot) and slot[index].nbytes() >= nbytes:  # a smaller last batch fits
            storage = slot[index]
        else:
            # as torch's default_collate does in a worker: no copy when the batch is sent
            storage = torch.UntypedStorage._new_shared(nbytes)
            slot[index:] = [storage]
            if not self._fresh:
                self._fresh = True
                self._generations[self._slot_index] += 1
        if dtype == torch.uint8:
            return cached_rows(storage, shape)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def finish(self, batch: dict[str, Any]) -> None:
        """Add the ticket; images in buffers the main process already maps go as references."""
        slot = self._slot_index
        generation = self._generations[slot]
        batch[TICKET] = (self.worker, self.sequence, generation)
        self.sequence += 1
        # a fresh buffer bumped the generation, which the main process cannot have recorded yet
        if self.by_reference and self.mapped[self.worker * self.depth + slot] == generation:
            if "views" in batch:
                batch["views"] = [_reference(i, view) for i, view in enumerate(batch["views"])]
            else:
                batch["image"] = _reference(0, batch["image"])


def _reference(index: int, image: torch.Tensor) -> SlotImage:
    return SlotImage(index, image.storage_offset(), tuple(image.shape), image.stride())


class BatchReturns:
    """Main side: the buffers seen per worker slot, and the batches that still hold their slot,
    released in order once unused."""

    def __init__(self, released: Any, mapped: Any, depth: int):
        self.released, self.mapped, self.depth = released, mapped, depth
        self._buffers: dict[tuple[int, int, int], torch.UntypedStorage] = {}  # keeps slots mapped
        self._held: collections.deque[tuple[int, int, list[torch.UntypedStorage]]] = collections.deque()

    def receive(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Register ``batch`` (its ticket popped) as holding its slot; references become tensors."""
        worker, sequence, generation = batch.pop(TICKET)
        slot = sequence % self.depth
        key = "views" if "views" in batch else "image"
        images = batch[key] if key == "views" else [batch[key]]
        if isinstance(images[0], SlotImage):
            images = [self._tensor(worker, slot, image) for image in images]
            batch[key] = images if key == "views" else images[0]
        elif _use_count is None or images[0].is_pinned():  # pinned: the loader copied them already
            self.released[worker] = sequence + 1
            return batch
        else:
            for index, image in enumerate(images):
                self._buffers[worker, slot, index] = image.untyped_storage()
            self.mapped[worker * self.depth + slot] = generation
        self._held.append((worker, sequence, [image.untyped_storage() for image in images]))
        return batch

    def _tensor(self, worker: int, slot: int, image: SlotImage) -> torch.Tensor:
        storage = self._buffers[worker, slot, image.index]
        return torch.empty(0, dtype=torch.uint8).set_(storage, image.offset, image.shape, image.stride)

    def collect(self) -> None:
        """Release, oldest first, the batches whose images nothing references any more (the one
        reference left is ours)."""
        while self._held and all(_use_count(storage._cdata) == 1 for storage in self._held[0][2]):
            worker, sequence, _ = self._held.popleft()
            self.released[worker] = sequence + 1
