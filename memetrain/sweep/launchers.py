"""Launchers: start a stage's jobs and report their states while the sweep waits for them.

- ``local`` runs the jobs on this machine, ``max_parallel`` at a time (one by default), each on its
  own GPU (``CUDA_VISIBLE_DEVICES``) or its own share of the CPU cores (``OMP_NUM_THREADS``), each
  training writing to ``<job>/job.log``;
- ``slurm`` submits the stage's jobs as one submitit job array (``array_parallelism`` at a time),
  every array task a full run on ``nodes`` x ``tasks_per_node`` processes; states come from
  ``sacct`` (through submitit) and from the jobs' ``results.json``. Jobs still queued or running
  from an earlier invocation of the same sweep are attached to, not submitted again.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf

from memetrain.errors import ConfigError, MemetrainError
from memetrain.run_record import finished
from memetrain.sweep.job import SweepJob, read_endings
from memetrain.sweep.record import DONE, FAILED, PENDING, RUNNING, JobState
from memetrain.sweep.retry import RetryPolicy, classify

# srun of Slurm 22.05-23.02 does not pass the job's --cpus-per-task on to its tasks (submitit starts
# them with srun): each would be bound to one core, shared by the training and its loader workers
PASS_CPUS_PER_TASK = '[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK'

# Slurm states of a job that has not ended (submitit's list, plus the transient ones)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "COMPLETING",
                 "CONFIGURING", "RESIZING", "SUSPENDED", "READY", "UNKNOWN", "SIGNALING", "STAGE_OUT"}  # fmt: skip


class LocalHandle:
    def __init__(self, job: SweepJob):
        self.job, self.name, self.log = job, job.spec.name, job.log
        self.job_id = None
        self.state = JobState(PENDING, log=str(job.log))

    def poll(self) -> JobState:
        return self.state


class LocalLauncher:
    kind = "local"

    def __init__(self, cfg: DictConfig, sweep_dir: Path):
        self.cfg, self.sweep_dir = cfg, sweep_dir
        self.poll_seconds = cfg.poll_seconds
        self.policy = None  # a local job is not submitted again: re-run the sweep to resume it
        self.slots = local_slots(cfg.max_parallel, cfg.gpus)
        self._handles: list[LocalHandle] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def parameters(self, method: str | None = None) -> dict[str, Any]:
        if len(self.slots) == 1 and not self.slots[0]:
            return {"where": "this machine, one job at a time"}
        shares = ", ".join(" ".join(f"{k}={v}" for k, v in slot.items()) for slot in self.slots)
        return {"where": f"this machine, {len(self.slots)} jobs at a time ({shares})"}

    def job(self, spec) -> SweepJob:
        return SweepJob(spec, self.sweep_dir, log=self.sweep_dir / spec.name / "job.log", own_session=True)

    def check_methods(self, methods: set[str]) -> None:
        pass

    def submit(self, jobs: list[SweepJob], comment: str | None = None) -> list[LocalHandle]:
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

    def requeues(self, job_id: str) -> list[str]:
        return []

    def cancel_orphans(self, comment: str) -> list[str]:
        return []  # local jobs end with the sweep that ran them

    def _run(self, handles: list[LocalHandle]) -> None:
        free: queue.Queue[dict[str, str]] = queue.Queue()
        for slot in self.slots:
            free.put(slot)
        with ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="sweep-local") as pool:
            for handle in handles:
                pool.submit(self._run_one, handle, free)

    def _run_one(self, handle: LocalHandle, free: queue.Queue) -> None:
        slot = free.get()  # the GPU or the CPU share this job runs on, until it ends
        try:
            if self._stopping:
                return
            handle.job.env = slot
            handle.state = JobState(RUNNING, log=handle.state.log)
            try:
                handle.job()
            except Exception as err:  # a job's failure is reported in the sweep, not raised in this thread
                handle.state = JobState(FAILED, log=handle.state.log, error=f"{type(err).__name__}: {err}")
            else:
                handle.state = JobState(DONE, log=handle.state.log)
        finally:
            free.put(slot)


def local_slots(max_parallel: int, gpus: Any) -> list[dict[str, str]]:
    """The environment of each of ``max_parallel`` local jobs at a time: with GPUs (``gpus``: a list
    of device ids; ``auto``: ``CUDA_VISIBLE_DEVICES``, else the ones ``nvidia-smi -L`` lists) one GPU
    each; without, each its share of this machine's cores (``OMP_NUM_THREADS``; with one job at a
    time, nothing changes)."""
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise ConfigError(
            f"launcher.max_parallel={max_parallel!r}: give how many jobs run at once, 1 or more"
        )
    devices = _visible_gpus() if gpus == "auto" else [str(gpu) for gpu in (gpus or [])]
    if devices:
        if max_parallel > len(devices):
            raise ConfigError(
                f"launcher.max_parallel={max_parallel} but this machine has {len(devices)} GPU(s) ({', '.join(devices)}): "
                "one job per GPU; lower max_parallel, or set launcher.gpus=[] to run on the CPU"
            )
        return [{"CUDA_VISIBLE_DEVICES": device} for device in devices[:max_parallel]]
    if max_parallel == 1:
        return [{}]
    threads = max(1, (os.cpu_count() or 1) // max_parallel)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(max_parallel)]


def _visible_gpus() -> list[str]:
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


class SlurmQueue:
    """Slurm's state of every job the sweep watches, refreshed once per poll: one ``squeue`` call
    for the jobs slurmctld still holds (queued, running, completing, and ended within its
    MinJobAge), one ``sacct`` call for the others. When a call fails (slurmctld restarting, a
    timeout) the states stay as they were until the next poll.

    Two ends leave no record. A pending array task cancelled before it ever started is dropped
    from its array: neither squeue nor sacct lists it again, while they still list its siblings.
    Such a task, unknown for ``DROPPED_AFTER_S`` while its array is listed, is reported
    ``CANCELLED``. A job that neither knows at all for ``LOST_AFTER_S`` is reported ``LOST``.
    """

    DROPPED_AFTER_S, LOST_AFTER_S = 15.0, 300.0

    def __init__(self):
        self._states: dict[str, str] = {}
        self._unknown_since: dict[str, float] = {}
        self._final: set[str] = set()
        self._watched: set[str] = set()
        self._failing = False

    def watch(self, job_id: str) -> None:
        self._watched.add(job_id)

    def state(self, job_id: str) -> str | None:
        """The job's Slurm state ("RUNNING", "CANCELLED by 0" ...); None while nobody knows it yet."""
        return self._states.get(job_id)

    def refresh(self) -> None:
        todo = self._watched - self._final
        if not todo:
            return
        rows = _slurm_rows(["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T"])
        if rows is None:
            if not self._failing:
                print(
                    "squeue failed: the jobs' states stay as last seen until Slurm answers", file=sys.stderr
                )
            self._failing = True
            return
        self._failing = False
        found = {row[0]: row[1] for row in rows if len(row) >= 2 and row[0] in todo}
        arrays = {row[0].split("_")[0] for row in rows if "_" in row[0]}  # arrays Slurm still lists
        rest = todo - found.keys()
        if rest:
            jobs = ",".join(sorted({job_id.split("_")[0] for job_id in rest}))
            command = ["sacct", "--allocations", "--noheader", "--parsable2", "--format=JobID,State",
                       f"--jobs={jobs}"]  # fmt: skip
            for row in _slurm_rows(command) or []:
                if "_" in row[0]:
                    arrays.add(row[0].split("_")[0])
                for job_id in _expand_ids(row[0]):
                    if job_id in rest and len(row) >= 2:
                        found[job_id] = row[1]
        now = time.monotonic()
        for job_id in todo:
            if job_id in found:
                self._states[job_id] = found[job_id]
                self._unknown_since.pop(job_id, None)
                if _word(found[job_id]) not in ACTIVE_STATES:
                    self._final.add(job_id)
                continue
            unknown_for = now - self._unknown_since.setdefault(job_id, now)
            if job_id.split("_")[0] in arrays and "_" in job_id and unknown_for > self.DROPPED_AFTER_S:
                self._states[job_id] = "CANCELLED (dropped from its array before it started)"
                self._final.add(job_id)
            elif unknown_for > self.LOST_AFTER_S:
                self._states[job_id] = "LOST"
                self._final.add(job_id)

    @staticmethod
    def requeues(job_id: str) -> list[str]:
        """How each earlier run of ``job_id`` ended before Slurm queued it again: ``sacct
        --duplicates`` keeps one record per run of a requeued job, the last one current."""
        base = job_id.split("_")[0]
        command = ["sacct", "--duplicates", "--allocations", "--noheader", "--parsable2",
                   "--format=JobID,State,End", f"--jobs={base}"]  # fmt: skip
        runs = [row for row in _slurm_rows(command) or [] if len(row) >= 3 and row[0] == job_id]
        return [f"Slurm requeued it at {end} ({state})" for _, state, end in runs[:-1]]

    @staticmethod
    def cancel(comment: str, wait_s: float = 120) -> list[str]:
        """Cancel every job that carries ``comment`` and wait until none of them runs; their ids."""
        command = ["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%k"]
        deadline, ours, cancelled = time.monotonic() + wait_s, [], False
        while True:
            rows = _slurm_rows(command)
            if rows is not None:
                ours = [row for row in rows if len(row) >= 3 and row[2] == comment]
                active = [row[0] for row in ours if _word(row[1]) in ACTIVE_STATES]
                if not active:
                    return [row[0] for row in ours]
                if not cancelled:
                    bases = sorted({job_id.split("_")[0] for job_id in active})
                    subprocess.run(["scancel", *bases], capture_output=True, timeout=60)
                    cancelled = True
            if time.monotonic() > deadline:
                raise MemetrainError(
                    f"Slurm jobs with comment {comment} ({', '.join(row[0] for row in ours) or 'squeue failed'}), "
                    f"submitted by a sweep driver killed before it recorded them, did not end within {wait_s:.0f} s "
                    "of scancel; make sure they ended (squeue --me), then run the sweep again"
                )
            time.sleep(1)


class SlurmHandle:
    def __init__(self, submitted: submitit.Job, results: Path, name: str, queue: SlurmQueue):
        self.submitted, self.results, self.name, self.queue = submitted, results, name, queue
        self.job_id: str = submitted.job_id
        self.log = submitted.paths.stdout  # stderr goes there too (stderr_to_stdout)
        queue.watch(self.job_id)

    def poll(self) -> JobState:
        """``done`` once results.json exists; ``failed`` once Slurm says the job ended (its processes
        are gone: a job is submitted again only then), with the cause."""
        state = JobState(log=str(self.log), slurm_job_id=self.job_id)
        if finished(self.results.parent):
            state.status = DONE
            return state
        slurm = self.queue.state(self.job_id)
        word = _word(slurm) if slurm else None
        if word in {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}:
            state.status = RUNNING
        elif word is None or word in ACTIVE_STATES:
            state.status = PENDING
        else:
            ending = classify(slurm, self.task_errors())
            state.status, state.error, state.cause = FAILED, ending.detail, ending.cause
        return state

    def task_errors(self) -> list[str]:
        """The line each task of the job left saying why it ended without results, by task."""
        return read_endings(self.submitted.paths.folder, self.job_id)


# launcher options a method (a row of the table) may set for its own jobs: launcher.methods.<method>
PER_METHOD = ("partition", "account", "qos", "constraint", "nodes", "tasks_per_node", "gpus_per_node",
              "cpus_per_task", "mem_gb", "time_minutes", "additional_parameters")  # fmt: skip


class SlurmLauncher:
    kind = "slurm"

    def __init__(self, cfg: DictConfig, sweep_dir: Path, name: str):
        if cfg.stop_timeout_s >= cfg.signal_delay_s:
            raise ConfigError(
                f"launcher.stop_timeout_s={cfg.stop_timeout_s} must be below launcher.signal_delay_s="
                f"{cfg.signal_delay_s}: the training saves within the first, Slurm kills after the second"
            )
        for method, options in cfg.methods.items():
            if not isinstance(options, DictConfig):
                raise ConfigError(
                    f"launcher.methods.{method}: give a mapping of launcher options, e.g. {{tasks_per_node: 2}}"
                )
            for key in set(options) - set(PER_METHOD):
                raise ConfigError(
                    f"launcher.methods.{method}.{key}: not an option a method can set for its jobs; "
                    f"give any of {', '.join(PER_METHOD)}"
                )
        self.cfg, self.sweep_dir, self.name = cfg, sweep_dir, name
        self.folder = sweep_dir / "slurm"
        self.poll_seconds = cfg.poll_seconds
        self.policy = RetryPolicy(cfg.on_cancel, cfg.max_retries)
        self.queue = SlurmQueue()

    def check_methods(self, methods: set[str]) -> None:
        """launcher.methods may only name methods of the sweep (a typo would go unnoticed)."""
        for method in set(self.cfg.methods) - methods:
            raise ConfigError(
                f"launcher.methods.{method}: the sweep has no method {method!r}; its methods are {', '.join(sorted(methods))}"
            )

    def parameters(self, method: str | None = None) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters (each one an sbatch option), for ``method``'s jobs."""
        c = self.cfg
        if method is not None and method in c.methods:
            c = OmegaConf.merge(c, c.methods[method])
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
            "setup": [PASS_CPUS_PER_TASK, *c.setup],
            "stderr_to_stdout": True,
        }
        return {key: value for key, value in parameters.items() if value not in (None, {}, [])}

    def job(self, spec) -> SweepJob:
        return SweepJob(spec, self.sweep_dir, self.cfg.max_requeues, self.cfg.stop_timeout_s)

    def submit(self, jobs: list[SweepJob], comment: str | None = None) -> list[SlurmHandle]:
        """One job array per method options (one for the whole stage unless launcher.methods
        sets some), each job carrying ``comment`` (sbatch --comment)."""
        groups: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            method = job.spec.group["method"]
            groups.setdefault(method if method in self.cfg.methods else "", []).append(index)
        handles: list[SlurmHandle | None] = [None] * len(jobs)
        for method, indices in groups.items():
            executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.cfg.max_requeues)
            executor.update_parameters(
                **self.parameters(method or None), **({"comment": comment} if comment else {})
            )
            with executor.batch():  # one job array
                submitted = [executor.submit(jobs[i]) for i in indices]
            for i, sub in zip(indices, submitted):
                handles[i] = SlurmHandle(
                    sub, jobs[i].directory / "results.json", jobs[i].spec.name, self.queue
                )
        return handles

    def attach(self, slurm_job_id: str, spec) -> SlurmHandle:
        """The handle of a job an earlier invocation submitted: the sweep waits for it if Slurm
        still has it, and treats it as any ended job (retried or reported) if it ended unwatched."""
        submitted = submitit.SlurmJob(folder=self.folder, job_id=slurm_job_id)
        return SlurmHandle(submitted, self.sweep_dir / spec.name / "results.json", spec.name, self.queue)

    def refresh(self) -> None:
        self.queue.refresh()  # one squeue (and at most one sacct) call for every job of the sweep

    def requeues(self, slurm_job_id: str) -> list[str]:
        return self.queue.requeues(slurm_job_id)

    def cancel_orphans(self, comment: str) -> list[str]:
        return self.queue.cancel(comment)

    def interrupt(self) -> str:
        return "the submitted jobs keep running; the same command waits for them again (and collects)"


def build_launcher(cfg: DictConfig, sweep_dir: Path, name: str) -> LocalLauncher | SlurmLauncher:
    if cfg.kind == "local":
        return LocalLauncher(cfg, sweep_dir)
    if cfg.kind == "slurm":
        return SlurmLauncher(cfg, sweep_dir, name)
    raise ConfigError(f"launcher.kind={cfg.kind!r}: choose launcher=local or launcher=slurm")


def _word(state: str) -> str:
    return state.split()[0].upper() if state.strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED


def _slurm_rows(command: list[str]) -> list[list[str]] | None:
    """The ``|``-separated rows a Slurm command prints; None when it fails."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def _expand_ids(job_id: str) -> list[str]:
    """``12_[3-5,7]`` -> 12_3, 12_4, 12_5, 12_7 (sacct's form of array tasks not yet started)."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(%\d+)?\]", job_id)
    if match is None:
        return [job_id]
    ids = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        ids += [f"{match.group(1)}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids
