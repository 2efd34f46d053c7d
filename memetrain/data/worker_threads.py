"""Loader workers as threads of the training process, delivering batches in a DataLoader's order.

A JPEG decode releases the GIL (the stream decodes a batch's JPEGs in one native call), so the
threads of one process decode in parallel, and a batch reaches the consumer without being pickled,
sent through a pipe and received. The threads share the work: each takes the next batch due,
whichever worker of the plan it belongs to, so none waits for the consumer to take another's batch
first, nor idles while another works through the rest of its share (only the epoch's last batch
runs alone). A view that runs much Python per sample (a
multi-crop of many torchvision transforms) holds the GIL for it, and there processes scale further.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()
_POLL_SECONDS = 0.1  # how soon a thread waiting for room sees that the consumer has gone


class WorkerThreads:
    """Run the tasks of ``tasks()`` (one iterator per epoch) as ``run(task, thread)`` on
    ``threads`` threads, at most ``lead`` of them ahead of the consumer; iterate to get their
    results in the tasks' order.

    An exception in a task, or in ``tasks()`` itself, is raised in the consumer in that task's
    place. Closing the iterator early (``break``) stops and joins the threads.
    """

    def __init__(
        self,
        tasks: Callable[[], Iterator[Any]],
        run: Callable[[Any, int], Any],
        threads: int,
        lead: int,
    ):
        self.tasks, self.run, self.threads, self.lead = tasks, run, threads, lead

    def __iter__(self) -> Iterator[Any]:
        tasks, taking = self.tasks(), threading.Lock()  # taking: guards the tasks and their numbers
        numbers = itertools.count()
        done, results = threading.Condition(), {}
        room, stop = threading.Semaphore(self.lead), threading.Event()

        def work(thread: int) -> None:
            while not stop.is_set():
                if not room.acquire(timeout=_POLL_SECONDS):
                    continue
                with taking:
                    number = next(numbers)
                    try:
                        task = next(tasks, _END)
                    except BaseException as err:  # noqa: BLE001 - raised again in the consumer
                        task = err
                if task is _END or isinstance(task, BaseException):
                    result = task
                else:
                    try:
                        result = self.run(task, thread)
                    except BaseException as err:  # noqa: BLE001 - raised again in the consumer
                        result = err
                with done:
                    results[number] = result
                    done.notify_all()
                if result is _END or isinstance(result, BaseException):
                    return
                # not held while waiting for room: the consumer's release of a batch's buffers
                # counts the references to them (``shared_batches``)
                del task, result

        workers = [
            threading.Thread(target=work, args=(thread,), name=f"meme-loader-{thread}", daemon=True)
            for thread in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        try:
            for number in itertools.count():
                with done:
                    done.wait_for(lambda number=number: number in results)
                    result = results.pop(number)
                if result is _END:
                    return
                if isinstance(result, BaseException):
                    raise result
                room.release()
                yield result
        finally:
            stop.set()
            for worker in workers:
                worker.join()
