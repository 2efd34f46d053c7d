"""Where the stream's batches are made: DataLoader worker processes, or worker threads.

:class:`SlotDataset` is the DataLoader's dataset: in each worker process it hooks up a ring of
shared image buffers (``shared_batches``), makes its share of the epoch's batches (each chunk of
``slot_samples`` read, then assembled by ``batch_assembly``) and sends a stream error as an item.
For worker threads (``worker_threads``) it hands out the same batches as tasks. A worker process
ends with its parent, keeps serving through Slurm's stop signals for a grace period, and keeps the
memory it frees for reuse (:func:`init_worker`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import Synchronized
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memetrain.data import slot_samples
from memetrain.data.batch_assembly import BatchAssembler
from memetrain.data.shared_batches import SharedBatches
from memetrain.data.slot_samples import Chunk, SlotSamples
from memetrain.data.stream_error import StreamError
from memetrain.data.worker_threads import WorkerThreads
from memetrain.errors import MemetrainError

if TYPE_CHECKING:
    from memetrain.data.stream import StreamSettings

log = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR2}
STOP_GRACE_SECONDS = 60  # a loader worker outlives SIGTERM / SIGUSR2 this long (see _outlive_stop_signals)
PARENT_POLL_SECONDS = 1.0  # how often a loader worker's signal thread checks that its parent lives
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


class SlotDataset(IterableDataset):
    """This rank's batches of the current epoch (``epoch`` and ``skip``, the batches already
    delivered, are shared values the main process sets), made from ``samples`` by ``assemble``;
    ``released`` and ``mapped`` are the shared counters of the workers' rings of ``ring_depth``
    image buffers (see ``shared_batches``)."""

    def __init__(
        self,
        samples: SlotSamples,
        assemble: BatchAssembler,
        settings: StreamSettings,
        epoch: Synchronized,
        skip: Synchronized,
        released: Any,
        mapped: Any,
        ring_depth: int,
    ):
        self.samples, self.assemble, self.s = samples, assemble, settings
        self.epoch, self.skip = epoch, skip
        self.released, self.mapped, self.ring_depth = released, mapped, ring_depth
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
        skip = self.skip.value
        worker = (worker_id + skip) % workers
        bad = 0
        for chunk in self.samples.chunks(self.epoch.value, skip, worker, workers):
            batch, bad_in_batch = self._make(chunk, shared)
            bad = self._count_bad(bad + bad_in_batch, worker)
            yield batch

    def tasks(self, workers: int) -> Iterator[Callable[[SharedBatches], dict[str, Any]]]:
        """The current epoch's batches still to deliver, in the order a loader with ``workers``
        workers delivers them, as tasks that any thread can run with its own ring of buffers."""
        epoch, skip, lock = self.epoch.value, self.skip.value, threading.Lock()
        chunks = [self.samples.chunks(epoch, skip, worker, workers) for worker in range(workers)]
        bad = [0] * workers

        def make(chunk: Chunk, worker: int, ring: SharedBatches) -> dict[str, Any]:
            batch, bad_in_batch = self._make(chunk, ring)
            with lock:
                bad[worker] = self._count_bad(bad[worker] + bad_in_batch, worker)
            return batch

        for delivered in itertools.count(skip):
            worker = delivered % workers
            chunk = next(chunks[worker], None)
            if chunk is None:  # every worker has the same number of batches
                return
            yield functools.partial(make, chunk, worker)

    def _make(self, chunk: Chunk, shared: SharedBatches | None) -> tuple[dict[str, Any], int]:
        """A chunk's batch and its bad samples, its members read first."""
        return self.assemble(
            slot_samples.read(chunk.samples), chunk.epoch, chunk.slot, chunk.position, shared
        )

    def _count_bad(self, bad: int, worker: int) -> int:
        if bad > self.s.max_bad_samples:
            raise StreamError(
                f"{bad} bad samples on rank {self.samples.rank} worker {worker}, over max_bad_samples="
                f"{self.s.max_bad_samples} (see the warnings above for which); fix or re-pack the shards"
            )
        return bad


def dataloader(dataset: SlotDataset, settings: StreamSettings) -> DataLoader:
    """The DataLoader whose worker processes run ``dataset`` (none: it runs in this process);
    iterate it with :func:`batches_from`, in the thread that creates it."""
    workers = settings.num_workers > 0
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=settings.num_workers,
        pin_memory=settings.pin_memory,
        persistent_workers=workers,
        prefetch_factor=settings.prefetch_factor if workers else None,
        collate_fn=_as_sent,
        # its own generator: creating an iterator must not draw from the global torch RNG,
        # or a resumed run's dropout would differ from an uninterrupted one's
        generator=torch.Generator().manual_seed(settings.seed),
        # the workers are forked by this thread, at the loader's first iteration
        worker_init_fn=functools.partial(
            init_worker,
            parent=os.getpid(),
            forked_by_main_thread=threading.current_thread() is threading.main_thread(),
        ),
    )


def _as_sent(batch: dict[str, Any]) -> dict[str, Any]:
    """The loader's collate function: batches are made by the slot dataset, numpy arrays kept."""
    return batch


def batches_from(loader: DataLoader) -> Iterator[dict[str, Any]]:
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


def worker_threads(dataset: SlotDataset, settings: StreamSettings) -> WorkerThreads:
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


def init_worker(worker_id: int, parent: int, forked_by_main_thread: bool) -> None:
    end_with_parent(parent, forked_by_main_thread)
    _outlive_stop_signals(parent)
    keep_freed_memory()
    # the workers are the parallelism: a tokenizer's own threads would only compete with them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def end_with_parent(parent: int, forked_by_main_thread: bool) -> None:
    """Have the kernel SIGKILL this process when its parent ``parent`` dies, whatever its threads
    are blocked on (a worker orphaned by a ``kill -9`` of the training kept 680 MB for 38 minutes,
    a thread blocked writing to the dead parent's pipe). Linux sends that signal when the *thread*
    that forked the process ends, so it is set only when that was the parent's main thread (which
    ends with the process); otherwise the signal thread of :func:`_outlive_stop_signals`, which
    checks the parent every ``PARENT_POLL_SECONDS``, ends the worker. A parent that died before
    the signal was set is seen at once."""
    if forked_by_main_thread and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning(
                "cannot set the loader worker's parent-death signal: %s", os.strerror(ctypes.get_errno())
            )
    if os.getppid() != parent:
        os._exit(0)


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


def _outlive_stop_signals(parent: int) -> None:
    """Slurm signals every process of a job (SIGTERM on preemption, SIGUSR2 before its time limit),
    and the training checkpoints after its current step, for which it may still need batches: a
    worker so signalled keeps serving for STOP_GRACE_SECONDS, then SIGALRM ends it (torch's own
    SIGTERM handler would end it at once and fail the step). A SIGTERM from the worker's own
    parent (multiprocessing ending its children at exit) still ends it at once, or an exiting
    training would wait out the grace and die on a worker killed by SIGALRM. Only the signal's
    sender tells the two apart, so a thread takes the signals with ``sigtimedwait``; every thread
    of the worker blocks them (see :func:`batches_from`). Between signals the thread checks that
    ``parent`` lives (see :func:`end_with_parent`): it waits on nothing the other threads might."""

    def take_signals() -> None:
        while True:
            received = signal.sigtimedwait(STOP_SIGNALS, PARENT_POLL_SECONDS)
            if os.getppid() != parent:
                os._exit(0)
            if received is None:
                continue
            if received.si_pid == parent and received.si_signo == signal.SIGTERM:
                os._exit(0)
            signal.alarm(STOP_GRACE_SECONDS)

    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already so when forked by batches_from
    threading.Thread(target=take_signals, name="stop-signals", daemon=True).start()
