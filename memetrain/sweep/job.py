"""One sweep job as a submitit Checkpointable: its runs, each a training process
(``python -m memetrain train``, what ``launcher/train.py`` runs), in order.

A run that already has ``results.json`` is skipped, so a requeued or re-run job continues where it
stopped, and an interrupted training resumes from its newest checkpoint (``resume=auto``).

Preemption and time limits under submitit: Slurm signals every process of the job (SIGUSR2 before
the time limit, SIGTERM on preemption); the training checkpoints after its current step and exits
with ``STOPPED_EXIT_CODE`` (:mod:`memetrain.engine.stopping`). On rank 0 submitit calls
:meth:`SweepJob.checkpoint`, which waits for the training to have saved and returns this job for
submitit to requeue, at most ``max_requeues`` times. Under several tasks (``tasks_per_node``,
``nodes``) every task starts its own training process with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT mapped from the task's Slurm variables (:mod:`memetrain.slurm_env`, the mapping
``launcher/train.py`` makes under srun), so each array task is one distributed run.

A job that ends without results leaves, beside submitit's files, one JSON file per task with the
line that says why (:func:`ending_path`), which the sweep reads to decide whether to retry it
(:mod:`memetrain.sweep.retry`): nothing of it is unpickled.

This module imports neither torch nor the library's training code: the submitit process that runs
it stays small while the training runs beside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths
from submitit.helpers import Checkpointable, DelayedSubmission

from memetrain.errors import PEER_FAILED_EXIT_CODE, STOPPED_EXIT_CODE, MemetrainError
from memetrain.fileio import atomic_write_json
from memetrain.run_record import finished
from memetrain.slurm_env import torch_env
from memetrain.sweep.grid import AFTER, PRETRAIN, JobSpec, fill_weights

TRAIN_COMMAND = (sys.executable, "-m", "memetrain", "train")  # also from a wheel, which has no launcher/
# in the error of a run whose process died by a signal, or whose peer did: memetrain.sweep.retry retries such a job
KILLED = "training was killed by"
PEER_DIED = "training stopped: another process of the run died"
NOT_REQUEUED = "not requeued again"  # in the ending of a job past launcher.max_requeues


class JobFailed(MemetrainError):
    """A run of a sweep job ended without results."""


class SweepJob(Checkpointable):
    def __init__(
        self,
        spec: JobSpec,
        sweep_dir: Path,
        max_requeues: int = 0,
        stop_timeout_s: float = 60.0,
        log: Path | None = None,
        own_session: bool = False,
    ):
        """``log``: where the training processes write (appended); None: this process's stdout
        and stderr (submitit's log files under Slurm). ``own_session``: start them in their own
        session, so a Ctrl-C in the terminal reaches only the sweep, which stops them cleanly."""
        self.spec, self.sweep_dir, self.log, self.own_session = spec, Path(sweep_dir), log, own_session
        self.max_requeues, self.stop_timeout_s = max_requeues, stop_timeout_s
        self.requeues = 0
        self.env: dict[str, str] = {}  # set for this job by the launcher (a local job's GPU or CPU share)
        self._child: subprocess.Popen | None = None
        self._stopping = False

    @property
    def directory(self) -> Path:
        return self.sweep_dir / self.spec.name

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None, "_stopping": False}  # process state is not part of the job

    def __call__(self) -> str:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **_distributed_env(), **self.env}
        for relative, overrides in self.spec.runs:
            run_dir = (self.directory / relative).resolve()
            if finished(run_dir):
                continue
            if self._stopping:
                raise JobFailed(f"{run_dir}: not started, the sweep was interrupted; re-run it to resume")
            args = fill_weights(overrides, self._weights(overrides))
            code = self._train([*args, f"hydra.run.dir={run_dir}"], env)
            if code == STOPPED_EXIT_CODE and "SUBMITIT_FOLDER" in os.environ:
                self._await_requeue()
            if code != 0:
                where = self.log or "the job's log"
                error = f"{run_dir}: {_ending(code)} (see {where}); re-run the sweep to resume it"
                _record_ending(error)
                raise JobFailed(error)
        return str(self.directory / "results.json")

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission | None:
        """Called by submitit on rank 0 when the job is preempted or times out: let the training
        save and exit, then hand submitit this job to requeue (None: do not requeue)."""
        if self._child is not None:
            self._child.send_signal(signal.SIGUSR2)  # Slurm signalled it too, unless it was only us
            self._await_exit(self._child.pid)
        if self.requeues >= self.max_requeues:
            error = (
                f"{self.spec.name}: requeued {self.requeues} times (launcher.max_requeues), {NOT_REQUEUED}. "
                "The training saved a checkpoint: re-run the sweep to resume it."
            )
            print(error, file=sys.stderr)
            _record_ending(error)
            return None
        self.requeues += 1
        return super().checkpoint(*args, **kwargs)

    def stop(self) -> None:
        """Ask the running training to checkpoint and exit (it resumes when the job runs again)."""
        self._stopping = True
        if self._child is not None:
            self._child.send_signal(signal.SIGTERM)

    def _train(self, args: list[str], env: dict[str, str]) -> int:
        command = [*TRAIN_COMMAND, *args]
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") if self.log is not None else nullcontext() as out:
            if out is not None:
                out.write(f"\n$ {' '.join(command)}\n".encode())
                out.flush()
            self._child = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=self.own_session,
            )
            if self._stopping:  # stop() came while this process started
                self._child.send_signal(signal.SIGTERM)
            try:
                while (code := self._child.poll()) is None:
                    time.sleep(0.5)  # polling, not wait(): checkpoint() may run in between, from a signal
            finally:
                self._child = None
        return code

    def _await_requeue(self) -> None:
        """The training stopped on Slurm's signal: rank 0's submitit handler now requeues the job,
        which ends this process. If rank 0 gives up instead (past max_requeues), its result file
        appears and this task stops waiting, so the job does not hold its nodes any longer."""
        env = submitit.JobEnvironment()
        rank0_result = JobPaths(env.paths.folder, job_id=env.job_id, task_id=0).result_pickle
        deadline = time.monotonic() + self.stop_timeout_s + 60
        while time.monotonic() < deadline and (env.global_rank == 0 or not rank0_result.exists()):
            time.sleep(1)

    def _await_exit(self, pid: int) -> None:
        """Wait (bounded) until ``pid`` has exited, without reaping it: the job's own poll() does.
        Popen.wait() cannot be used here, from inside a signal handler that may have interrupted it."""
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return
            except ChildProcessError:
                return  # already reaped
            time.sleep(0.2)
        print(f"{self.spec.name}: the training did not stop within {self.stop_timeout_s} s", file=sys.stderr)

    def _weights(self, overrides: list[str]) -> dict[str, Path]:
        """The weights files the placeholders in ``overrides`` stand for (their runs have finished)."""
        text = " ".join(overrides)
        needed = {PRETRAIN: self.directory / "pretrain"} if PRETRAIN in text else {}
        if AFTER in text:
            needed[AFTER] = self.sweep_dir / self.spec.after
        return {token: latest_weights(run_dir) for token, run_dir in needed.items()}


def ending_path(folder: Path, job_id: str, task: int) -> Path:
    """Where task ``task`` of the Slurm job ``job_id`` (``123_4`` in an array) says why it ended
    without results, in submitit's folder of the job."""
    return Path(folder) / f"{job_id}_{task}_ending.json"


def _record_ending(error: str) -> None:
    """This task's ending, for the sweep driver (under submitit only: the local launcher watches its
    jobs itself)."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return
    env = submitit.JobEnvironment()
    atomic_write_json(ending_path(env.paths.folder, env.job_id, env.global_rank), {"error": error})


def read_endings(folder: Path, job_id: str) -> list[str]:
    """The endings the tasks of ``job_id`` recorded, by task (a task killed before it could write
    one records none; an unreadable file says so)."""
    endings = []
    for path in sorted(
        Path(folder).glob(f"{job_id}_*_ending.json"), key=lambda p: int(p.name.split("_")[-2])
    ):
        try:
            endings.append(str(json.loads(path.read_text())["error"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            endings.append(f"{path.name} is unreadable ({type(err).__name__})")
    return endings


def _ending(code: int) -> str:
    if code == STOPPED_EXIT_CODE:
        return "training stopped by a signal"
    if code == PEER_FAILED_EXIT_CODE:
        return PEER_DIED
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{KILLED} {name}"
    return f"training failed with exit code {code}"


def latest_weights(run_dir: Path) -> Path:
    """``model.safetensors`` of the newest complete checkpoint of a finished run."""
    found = sorted(run_dir.glob("checkpoints/step_*/model.safetensors"), key=lambda p: int(p.parent.name[5:]))
    if not found:
        raise JobFailed(f"{run_dir} has no checkpoints/step_*/model.safetensors: did that run finish?")
    return found[-1]


def _distributed_env() -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT of this task when it runs in an srun step
    (submitit starts every task of a job with srun), from Slurm's variables; empty elsewhere."""
    return torch_env(os.environ)
