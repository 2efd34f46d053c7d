"""Why a sweep job's Slurm job ended without results, and whether the sweep submits it again.

A job can end without ``results.json`` for reasons outside its runs: someone cancelled it
(``scancel``), a process of it was killed (the kernel's OOM killer, an admin, a lost node), the
node failed, or Slurm no longer knows the job. The driver submits such a job again, at most
``launcher.max_retries`` times, and the new job resumes the interrupted training from its newest
checkpoint (the runs that finished are skipped). A cancelled job is retried only with
``launcher.on_cancel=retry``; with ``fail`` it is reported as cancelled. A run that failed on its
own (an error in its log), ran out of memory, or stopped at its time limit past
``launcher.max_requeues`` is reported at once: the same job would end the same way.

Every ending is kept in ``sweep.json`` (``history``: the Slurm job, the cause, the detail, and
what the driver did: ``retried``, ``reported``, or ``resumed`` for a requeue inside Slurm), so a
driver restarted after a crash goes on counting where the first one stopped. The count starts
again after a job was reported: running the sweep again is the user's decision to retry.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from memetrain.errors import ConfigError
from memetrain.sweep.job import KILLED, NOT_REQUEUED, PEER_DIED

CANCELLED, KILLED_CAUSE, NODE_FAILURE, PREEMPTED, LOST = (
    "cancelled",
    "killed",
    "node_failure",
    "preempted",
    "lost",
)
TIME_LIMIT, OUT_OF_MEMORY, ERROR, REQUEUED = "time_limit", "out_of_memory", "error", "requeued"
RETRIED, REPORTED, RESUMED = "retried", "reported", "resumed"  # what the driver did after an ending
OUTSIDE = {KILLED_CAUSE, NODE_FAILURE, PREEMPTED, LOST}  # causes outside the job's runs: retried
ON_CANCEL = ("retry", "fail")

# Slurm's final job states and the cause each stands for
_SLURM_CAUSES = {
    "CANCELLED": CANCELLED,
    "NODE_FAIL": NODE_FAILURE,
    "BOOT_FAIL": NODE_FAILURE,
    "PREEMPTED": PREEMPTED,
    "TIMEOUT": TIME_LIMIT,
    "DEADLINE": TIME_LIMIT,
    "OUT_OF_MEMORY": OUT_OF_MEMORY,
    "LOST": LOST,  # not Slurm's: the job is unknown to squeue and sacct (memetrain.sweep.launchers)
}


@dataclass(frozen=True)
class Ending:
    cause: str  # one of the constants above
    detail: str  # one line: the Slurm state, or the error line of a task


def classify(slurm_state: str, task_errors: Sequence[str]) -> Ending:
    """The cause of a job that ended in ``slurm_state`` ("CANCELLED by 0", "FAILED") without results,
    from the state and the lines its tasks left (:func:`memetrain.sweep.job.read_endings`; none if
    a task was killed before it could write one)."""
    state = slurm_state.split()[0].upper() if slurm_state else "UNKNOWN"
    if state in _SLURM_CAUSES:
        return Ending(_SLURM_CAUSES[state], f"Slurm state {slurm_state}")
    for error in task_errors:
        if NOT_REQUEUED in error:
            return Ending(TIME_LIMIT, error)
    for error in task_errors:
        if KILLED in error or PEER_DIED in error:
            return Ending(KILLED_CAUSE, error)
    if task_errors:
        return Ending(ERROR, task_errors[0])
    if state == "COMPLETED":
        return Ending(ERROR, "Slurm state COMPLETED, but the job wrote no results.json")
    return Ending(KILLED_CAUSE, f"Slurm state {slurm_state} and no task wrote a result: a process was killed")


@dataclass(frozen=True)
class RetryPolicy:
    on_cancel: str  # retry | fail
    max_retries: int

    def __post_init__(self):
        if self.on_cancel not in ON_CANCEL:
            raise ConfigError(f"launcher.on_cancel={self.on_cancel!r}: choose {' or '.join(ON_CANCEL)}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(
                f"launcher.max_retries={self.max_retries!r}: give 0 or more submissions of a job"
            )

    def decide(self, ending: Ending, history: Sequence[dict]) -> tuple[bool, str]:
        """(whether to submit the job again, a note for the report when not: empty for a job that
        failed on its own, whose error says it all)."""
        if ending.cause == CANCELLED and self.on_cancel == "fail":
            return False, "launcher.on_cancel=fail"
        if ending.cause not in OUTSIDE | {CANCELLED}:
            return False, ""
        if retries_since_reported(history) >= self.max_retries:
            return False, f"retried {self.max_retries} times already (launcher.max_retries)"
        return True, ""


def retries_since_reported(history: Sequence[dict]) -> int:
    """Retries since the job was last reported as failed: the ones counted against max_retries."""
    count = 0
    for event in history:
        count = 0 if event.get("then") == REPORTED else count + (event.get("then") == RETRIED)
    return count


def event(slurm_job_id: str | None, ending: Ending, then: str) -> dict:
    """One entry of a job's ``history`` in sweep.json."""
    at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {
        "slurm_job_id": slurm_job_id,
        "cause": ending.cause,
        "detail": ending.detail,
        "then": then,
        "at": at,
    }
