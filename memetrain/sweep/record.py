"""``sweep.json``: every job of a sweep, its place in the grid, its overrides, status and log.

The collector reads it (``runs/sweeps/<sweep>/sweep.json``; each job's run directory is
``runs/sweeps/<sweep>/<job name>/``). Rewritten atomically whenever a status changes, so it always
says what has run: ``pending``, ``running``, ``done`` (``results.json`` exists) or ``failed``.

Each job also says how its Slurm jobs ended before the one that counts (:mod:`memetrain.sweep.retry`):
``retries`` (times the driver submitted it again), ``requeues`` (times Slurm requeued it in place:
``scontrol requeue``, preemption, a time limit), ``cause`` (why it failed, when it did) and
``history``, one entry per ending: ``{slurm_job_id, cause, detail, then, at}``. Records written
before these fields existed read as jobs without history.

While the driver submits (between ``sbatch`` and the line that records the new Slurm job ids) the
header holds ``submitting``: the comment those jobs carry, so a driver killed in between has its
unrecorded jobs found and cancelled by the next one, never run twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memetrain.errors import ConfigError
from memetrain.fileio import atomic_write_json
from memetrain.sweep.grid import JobSpec
from memetrain.sweep.retry import REQUEUED, RETRIED

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
FILENAME = "sweep.json"


@dataclass
class JobState:
    status: str = PENDING
    log: str | None = None  # where its training processes wrote
    error: str | None = None  # why it failed
    slurm_job_id: str | None = None
    cause: str | None = None  # why it failed (memetrain.sweep.retry): cancelled, killed, error ...


def job_entry(spec: JobSpec, state: JobState, history: list[dict] | None = None) -> dict[str, Any]:
    history = history or []
    return {
        "name": spec.name,
        "group": spec.group,
        "seed": spec.seed,
        "overrides": spec.overrides,
        "pretrain": spec.pretrain,
        "after": spec.after,
        "stage": spec.stage,
        "status": state.status,
        "log": state.log,
        "error": state.error,
        "slurm_job_id": state.slurm_job_id,
        "cause": state.cause,
        "retries": sum(event["then"] == RETRIED for event in history),
        "requeues": sum(event["cause"] == REQUEUED for event in history),
        "history": history,
    }


def write(
    sweep_dir: Path,
    header: dict[str, Any],
    jobs: list[JobSpec],
    states: dict[str, JobState],
    histories: dict[str, list[dict]] | None = None,
) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    histories = histories or {}
    entries = [job_entry(spec, states[spec.name], histories.get(spec.name)) for spec in jobs]
    atomic_write_json(sweep_dir / FILENAME, {**header, "jobs": entries})


def load(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The jobs of an earlier invocation's ``sweep.json`` by name (none if there is no record)."""
    return load_record(sweep_dir)[1]


def load_record(sweep_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An earlier invocation's ``sweep.json``: its header and its jobs by name (empty without one)."""
    path = sweep_dir / FILENAME
    if not path.is_file():
        return {}, {}
    try:
        content = json.loads(path.read_text())
        jobs = {entry["name"]: entry for entry in content["jobs"]}
        for entry in jobs.values():
            history = entry.get("history") or []  # absent from records written before retries existed
            if not isinstance(history, list) or not all(isinstance(e, dict) and "then" in e for e in history):
                raise TypeError(f"job {entry['name']}: history is not a list of endings")
            entry["history"] = history
        return {k: v for k, v in content.items() if k != "jobs"}, jobs
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"{path} is not a sweep record ({err}); move it away to start the sweep over"
        ) from None


def check_unchanged(sweep_dir: Path, previous: dict[str, dict[str, Any]], jobs: list[JobSpec]) -> None:
    """A job that already has a run directory must keep its overrides: its results (and a resumed
    training) came from them."""
    for spec in jobs:
        old = previous.get(spec.name)
        if old is None or not (sweep_dir / spec.name).is_dir():
            continue
        for key in ("overrides", "pretrain", "after"):
            if old.get(key) != getattr(spec, key):
                raise ConfigError(
                    f"{sweep_dir / spec.name} was run with {key}={old.get(key)} and the sweep now gives it "
                    f"{getattr(spec, key)}: give this sweep another name= (a new directory), or delete that "
                    "job's directory to redo it"
                )
