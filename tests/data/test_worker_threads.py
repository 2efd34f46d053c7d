"""WorkerThreads: tasks run on several threads, results in the tasks' order, errors in their place,
never more than ``lead`` tasks ahead of the consumer, and no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest

from memetrain.data.worker_threads import WorkerThreads


def test_results_come_in_task_order_whichever_thread_finishes_first():
    def run(task: int, thread: int) -> tuple[int, int]:
        time.sleep(0.003 * (task % 3))  # later tasks often finish first
        return task, thread

    pool = WorkerThreads(lambda: iter(range(40)), run, threads=3, lead=6)
    for _ in range(2):  # a new pass of tasks per iteration, as per epoch
        results = list(pool)
        assert [task for task, _ in results] == list(range(40))
        assert len({thread for _, thread in results}) > 1, "the threads share the tasks"


def test_no_more_than_lead_tasks_run_ahead_of_the_consumer():
    started, lock = [], threading.Lock()

    def run(task: int, thread: int) -> int:
        with lock:
            started.append(task)
        return task

    iterator = iter(WorkerThreads(lambda: iter(range(100)), run, threads=2, lead=4))
    for consumed in range(1, 6):
        assert next(iterator) == consumed - 1
        time.sleep(0.05)  # room for the threads to run ahead as far as they may
        with lock:
            assert len(started) <= consumed + 4
    iterator.close()


@pytest.mark.parametrize("where", ["task", "tasks"])
def test_an_error_is_raised_in_its_place_and_the_threads_end(where):
    def tasks():
        yield from range(5)
        if where == "tasks":
            raise ValueError("the plan broke at 5")
        yield from range(5, 10)

    def run(task: int, thread: int) -> int:
        if where == "task" and task == 5:
            raise ValueError("task 5 broke")
        return task

    threads = threading.active_count()
    received = []
    with pytest.raises(ValueError, match="5 broke" if where == "task" else "plan broke at 5"):
        for result in WorkerThreads(tasks, run, threads=2, lead=3):
            received.append(result)
    assert received == [0, 1, 2, 3, 4]
    assert threading.active_count() == threads


def test_closing_early_stops_and_joins_the_threads():
    threads = threading.active_count()
    iterator = iter(WorkerThreads(lambda: iter(range(10**6)), lambda task, thread: task, threads=2, lead=4))
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    iterator.close()
    assert threading.active_count() == threads
