"""``sweep.json``: every job of a sweep, its place in the grid, its overrides, status and log.

The collector reads it (``runs/sweeps/<sweep>/sweep.json``; each job's run directory is
``runs/sweeps/<sweep>/<job name>/``). Rewritten atomically whenever a status changes, so it always
says what has run: ``pending``, ``running``, ``done`` (``results.json`` exists) or ``failed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memetrain.errors import ConfigError
from memetrain.fileio import atomic_write_json
from memetrain.sweep.grid import JobSpec

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
FILENAME = "sweep.json"


@dataclass
class JobState:
    status: str = PENDING
    log: str | None = None  # where its training processes wrote
    error: str | None = None  # why it failed
    slurm_job_id: str | None = None


def job_entry(spec: JobSpec, state: JobState) -> dict[str, Any]:
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
    }


def write(sweep_dir: Path, header: dict[str, Any], jobs: list[JobSpec], states: dict[str, JobState]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    entries = [job_entry(spec, states[spec.name]) for spec in jobs]
    atomic_write_json(sweep_dir / FILENAME, {**header, "jobs": entries})


def load(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The jobs of an earlier invocation's ``sweep.json`` by name (none if there is no record)."""
    path = sweep_dir / FILENAME
    if not path.is_file():
        return {}
    try:
        return {entry["name"]: entry for entry in json.loads(path.read_text())["jobs"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
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
