"""Loader workers as threads of the training process, in the order a DataLoader would deliver.

A JPEG decode releases the GIL, so with views that are mostly native work (a resize, a crop) the
threads of one process decode in parallel, and the batch reaches the consumer without being
pickled, sent through a pipe and received: that, and a third process competing for the cores,
cost worker processes a tenth of the decode limit (benchmarks/README.md). A view that runs much
Python per sample (a multi-crop of many torchvision transforms) holds the GIL for it, and there
processes scale further.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()
_POLL_SECONDS = 0.1  # how soon a worker blocked on a full queue sees that the consumer has gone


class WorkerThreads:
    """Run ``batches(worker_id)`` for ``workers`` threads; iterate to get batch t from worker
    t % workers, as ``DataLoader`` does. Each worker holds at most ``prefetch`` finished batches.

    An exception in a worker is raised in the consumer, in its place in the order. Closing the
    iterator early (``break``) stops and joins the threads.
    """

    def __init__(self, batches: Callable[[int], Iterator[dict[str, Any]]], workers: int, prefetch: int):
        self.batches, self.workers, self.prefetch = batches, workers, prefetch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        queues = [queue.Queue(self.prefetch) for _ in range(self.workers)]
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=self._work,
                args=(worker, queues[worker], stop),
                name=f"meme-loader-{worker}",
                daemon=True,
            )
            for worker in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        try:
            active = list(range(self.workers))
            while active:
                for worker in list(active):
                    item = queues[worker].get()
                    if item is _END:
                        active.remove(worker)
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def _work(self, worker: int, results: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self.batches(worker):
                if not _put(results, batch, stop):
                    return
        except BaseException as err:  # noqa: BLE001 - raised again in the consumer
            _put(results, err, stop)
        _put(results, _END, stop)


def _put(results: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item``, waiting for room unless the consumer stops; False if it stopped."""
    while not stop.is_set():
        try:
            results.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
