"""Image batches handed from a loader worker to the main process through reused shared memory.

A batch of 64 images at 224 px is 9.6 MB. When a worker returns a tensor, torch moves it into
fresh shared memory, whose pages the kernel faults in and zeroes, and the main process maps it
anew and faults it in again when the model reads it: at 224 px the worker's half alone took 15 %
of its time. Here each worker writes its batches' images into a ring of shared buffers (one
slot per batch in flight) and reuses a slot once the main process has released it; the main
process keeps every slot it has seen mapped, so torch hands it the same storage again (no new
mapping, no page faults on either side).

The main process releases a batch when nothing references its images any more (the consumer
dropped the batch and every view of it), in order, by advancing a counter per worker
(``released``). A worker writes into a slot only when the counter shows it was released, so a
buffer is never overwritten while anything may still read it; when no slot is free (a consumer
that keeps batches, an iterator dropped mid-epoch) it takes fresh shared memory, as torch would.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import torch

TICKET = "shared_batch"
"""Batch key of (worker, sequence number): which ring slot carried the batch's images."""

_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""References to a storage (private torch API); without it no slot is ever reused (always correct)."""


class SharedBatches:
    """Worker side: the shared buffers of the last ``depth`` batches this worker process produced."""

    def __init__(self, released: Any, worker: int, depth: int):
        self.released, self.worker, self.depth = released, worker, depth
        self.released[worker] = 0  # a new worker process: nothing of its own is in flight yet
        self.sequence = 0
        self._slots: list[list[torch.UntypedStorage]] = [[] for _ in range(depth)]
        self._slot: list[torch.UntypedStorage] = []
        self._reuse, self._used = False, 0

    def start(self) -> tuple[int, int]:
        """Begin the next batch; returns its ticket."""
        sequence, self.sequence = self.sequence, self.sequence + 1
        self._slot = self._slots[sequence % self.depth]
        self._reuse = self.released[self.worker] > sequence - self.depth  # the slot's last batch is free
        self._used = 0
        return self.worker, sequence

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in shared memory for the current batch."""
        nbytes = math.prod(shape) * dtype.itemsize
        index, self._used = self._used, self._used + 1
        if self._reuse and index < len(self._slot) and self._slot[index].nbytes() == nbytes:
            storage = self._slot[index]
        else:
            # as torch's default_collate does in a worker: no copy when the batch is sent
            storage = torch.UntypedStorage._new_shared(nbytes)
            self._slot[index:] = [storage]
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class BatchReturns:
    """Main side: the batches that still hold their ring slot, released in order once unused."""

    def __init__(self, released: Any, depth: int):
        self.released, self.depth = released, depth
        self._mapped: dict[tuple[int, int, int], torch.UntypedStorage] = {}  # keeps slots mapped
        self._held: collections.deque[tuple[int, int, list[torch.UntypedStorage]]] = collections.deque()

    def receive(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Register ``batch`` (its ticket popped) as holding its slot."""
        worker, sequence = batch.pop(TICKET)
        images = batch["views"] if "views" in batch else [batch["image"]]
        if _use_count is None or images[0].is_pinned():  # pinned: the loader copied them already
            self.released[worker] = sequence + 1
            return batch
        storages = [image.untyped_storage() for image in images]
        for index, storage in enumerate(storages):
            self._mapped[worker, sequence % self.depth, index] = storage
        self._held.append((worker, sequence, storages))
        return batch

    def collect(self) -> None:
        """Release, oldest first, the batches whose images nothing references any more (the one
        reference left is ours)."""
        while self._held and all(_use_count(storage._cdata) == 1 for storage in self._held[0][2]):
            worker, sequence, _ = self._held.popleft()
            self.released[worker] = sequence + 1
