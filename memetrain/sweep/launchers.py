"""Launchers: start a stage's jobs and report their states while the sweep waits for them.

- ``local`` runs the jobs one after another in a background thread on this machine (one training
  at a time), each training writing to ``<job>/job.log``;
- ``slurm`` submits the stage's jobs as one submitit job array (``array_parallelism`` at a time),
  every array task a full run on ``nodes`` x ``tasks_per_node`` processes; states come from
  ``sacct`` (through submitit) and from the jobs' ``results.json``. Jobs still queued or running
  from an earlier invocation of the same sweep are attached to, not submitted again.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from memetrain.errors import ConfigError
from memetrain.sweep.job import SweepJob
from memetrain.sweep.record import DONE, FAILED, PENDING, RUNNING, JobState

# Slurm states of a job that has not ended (submitit's list, plus the transient ones)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "COMPLETING",
                 "CONFIGURING", "RESIZING", "SUSPENDED", "READY", "UNKNOWN", "SIGNALING", "STAGE_OUT"}  # fmt: skip


class LocalHandle:
    def __init__(self, job: SweepJob):
        self.job, self.name, self.log = job, job.spec.name, job.log
        self.state = JobState(PENDING, log=str(job.log))

    def poll(self) -> JobState:
        return self.state


class LocalLauncher:
    kind = "local"

    def __init__(self, cfg: DictConfig, sweep_dir: Path):
        self.cfg, self.sweep_dir = cfg, sweep_dir
        self.poll_seconds = cfg.poll_seconds
        self._handles: list[LocalHandle] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def parameters(self) -> dict[str, Any]:
        return {"where": "this machine, one job at a time"}

    def job(self, spec) -> SweepJob:
        return SweepJob(spec, self.sweep_dir, log=self.sweep_dir / spec.name / "job.log", own_session=True)

    def submit(self, jobs: list[SweepJob]) -> list[LocalHandle]:
        self._handles = handles = [LocalHandle(job) for job in jobs]
        self._thread = threading.Thread(target=self._run, args=(handles,), name="sweep-local", daemon=True)
        self._thread.start()
        return handles

    def interrupt(self) -> str:
        """The sweep was interrupted: the running training checkpoints and stops, nothing else starts."""
        self._stopping = True
        for handle in self._handles:
            if handle.state.status == RUNNING:
                handle.job.stop()
        if self._thread is not None:
            self._thread.join(timeout=120)
        return "the running training saved a checkpoint; the same command resumes the sweep"

    def attach(self, slurm_job_id: str, spec) -> None:
        return None  # a local job does not outlive the sweep that ran it

    def refresh(self) -> None:
        pass

    def _run(self, handles: list[LocalHandle]) -> None:
        for handle in handles:
            if self._stopping:
                break
            handle.state = JobState(RUNNING, log=handle.state.log)
            try:
                handle.job()
            except Exception as err:  # a job's failure is reported in the sweep, not raised in this thread
                handle.state = JobState(FAILED, log=handle.state.log, error=f"{type(err).__name__}: {err}")
            else:
                handle.state = JobState(DONE, log=handle.state.log)


class SlurmHandle:
    def __init__(self, submitted: submitit.Job, results: Path, name: str):
        self.submitted, self.results, self.name = submitted, results, name
        self.log = submitted.paths.stdout  # stderr goes there too (stderr_to_stdout)

    def poll(self) -> JobState:
        state = JobState(log=str(self.log), slurm_job_id=self.submitted.job_id)
        if self.results.is_file():
            state.status = DONE
        elif self.submitted.paths.result_pickle.exists():  # ended, and without results: the error
            state.status, state.error = FAILED, _error_line(self.submitted.exception())
        else:
            slurm = self.submitted.state.split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
            if slurm == "RUNNING":
                state.status = RUNNING
            elif slurm in ACTIVE_STATES:
                state.status = PENDING
            else:
                state.status, state.error = FAILED, f"Slurm state {slurm}, no results"
        return state


class SlurmLauncher:
    kind = "slurm"

    def __init__(self, cfg: DictConfig, sweep_dir: Path, name: str):
        if cfg.stop_timeout_s >= cfg.signal_delay_s:
            raise ConfigError(
                f"launcher.stop_timeout_s={cfg.stop_timeout_s} must be below launcher.signal_delay_s="
                f"{cfg.signal_delay_s}: the training saves within the first, Slurm kills after the second"
            )
        self.cfg, self.sweep_dir, self.name = cfg, sweep_dir, name
        self.folder = sweep_dir / "slurm"
        self.poll_seconds = cfg.poll_seconds

    def parameters(self) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters (each one an sbatch option)."""
        c = self.cfg
        parameters = {
            "job_name": self.name,
            "partition": c.partition,
            "nodes": c.nodes,
            "ntasks_per_node": c.tasks_per_node,
            "gpus_per_node": c.gpus_per_node or None,  # no --gpus-per-node on CPU clusters
            "cpus_per_task": c.cpus_per_task,
            "mem": f"{c.mem_gb}GB" if c.mem_gb else None,
            "time": c.time_minutes,
            "account": c.account,
            "qos": c.qos,
            "constraint": c.constraint,
            "array_parallelism": c.array_parallelism,
            "signal_delay_s": c.signal_delay_s,
            "additional_parameters": OmegaConf.to_container(c.additional_parameters, resolve=True),
            "setup": list(c.setup),
            "stderr_to_stdout": True,
        }
        return {key: value for key, value in parameters.items() if value not in (None, {}, [])}

    def job(self, spec) -> SweepJob:
        return SweepJob(spec, self.sweep_dir, self.cfg.max_requeues, self.cfg.stop_timeout_s)

    def submit(self, jobs: list[SweepJob]) -> list[SlurmHandle]:
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.cfg.max_requeues)
        executor.update_parameters(**self.parameters())
        with executor.batch():  # one job array
            submitted = [executor.submit(job) for job in jobs]
        return [
            SlurmHandle(sub, job.directory / "results.json", job.spec.name)
            for job, sub in zip(jobs, submitted)
        ]

    def attach(self, slurm_job_id: str, spec) -> SlurmHandle | None:
        """The handle of a job an earlier invocation submitted, if Slurm still has it queued or running."""
        submitted = submitit.SlurmJob(folder=self.folder, job_id=slurm_job_id)
        if submitted.watcher.get_state(slurm_job_id, mode="force").split()[0].upper() not in ACTIVE_STATES - {
            "UNKNOWN"
        }:
            return None
        return SlurmHandle(submitted, self.sweep_dir / spec.name / "results.json", spec.name)

    def refresh(self) -> None:
        submitit.SlurmJob.watcher.update()  # one sacct call for every job of the sweep

    def interrupt(self) -> str:
        return "the submitted jobs keep running; the same command waits for them again (and collects)"


def build_launcher(cfg: DictConfig, sweep_dir: Path, name: str) -> LocalLauncher | SlurmLauncher:
    if cfg.kind == "local":
        return LocalLauncher(cfg, sweep_dir)
    if cfg.kind == "slurm":
        return SlurmLauncher(cfg, sweep_dir, name)
    raise ConfigError(f"launcher.kind={cfg.kind!r}: choose launcher=local or launcher=slurm")


def _error_line(error: BaseException | None) -> str:
    """The exception line of a failed job's trace (submitit frames it between rules of dashes)."""
    text = str(error or "no error recorded")
    parts = text.split("-" * 22)
    lines = [line for line in (parts[1] if len(parts) >= 3 else text).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
