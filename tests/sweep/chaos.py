"""A seeded chaos driver that runs beside a Slurm sweep and injects one fault of each kind.

Kinds: ``scancel`` of a pending job and of a running one, ``scontrol requeue`` of a running job,
SIGKILL of one rank's training process in a two-task job, a restart of ``slurmd`` while jobs run,
SIGKILL of the sweep driver followed by the same command again, and a second driver started on
the same sweep directory while the first one runs.

Every fault is armed with seeded parameters (:func:`plan`): the earliest moment it may fire, the
training steps its target must have logged in its current Slurm job, and a number that picks the
target among the candidates. It fires when the state it waits for is seen, as a user would see
it: a job RUNNING or PENDING in ``squeue``, its run directory's ``metrics.jsonl`` growing, both
ranks' training processes alive. So the moments differ from run to run only by where the
training is when it is looked at, never by whether a fault finds its moment. Per-job faults hit
distinct jobs (a job hit twice could use up its retries); the two-task jobs are kept for the rank
kill until it has fired.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import REPO

SECOND_DRIVER, SCANCEL_PENDING, SCANCEL_RUNNING = "second_driver", "scancel_pending", "scancel_running"
REQUEUE_RUNNING, KILL_RANK, RESTART_SLURMD, KILL_DRIVER = (
    "requeue_running",
    "kill_rank",
    "restart_slurmd",
    "kill_driver",
)
KINDS = (
    SCANCEL_RUNNING,
    SCANCEL_PENDING,
    REQUEUE_RUNNING,
    KILL_RANK,
    KILL_DRIVER,
    RESTART_SLURMD,
    SECOND_DRIVER,
)
PER_JOB = {SCANCEL_PENDING, SCANCEL_RUNNING, REQUEUE_RUNNING, KILL_RANK}
OTHER_RANK_BOUND_S = 120  # the surviving rank of a killed one must end within this (gloo notices at once)


@dataclass
class Fault:
    kind: str
    not_before: float  # seconds after the first job of the sweep ran
    steps: int  # training steps its target must have logged in its current Slurm job
    pick: float  # in [0, 1): which candidate it hits
    fired_s: float | None = None  # when it fired, seconds after the start
    target: str | None = None  # the sweep job it hit
    slurm_job_id: str | None = None
    active: list[str] = field(default_factory=list)  # jobs running or queued when it fired
    note: str = ""  # what was seen (the other rank's end, the refused driver's line ...)
    ok: bool = True  # False: the system misbehaved at the fault itself (the test fails on it)


def plan(seed: int) -> list[Fault]:
    """One fault of each kind, in a seeded order, each with seeded parameters."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    return [
        Fault(kind, not_before=rng.uniform(0, 30), steps=rng.randint(1, 6), pick=rng.random())
        for kind in kinds
    ]


class Drivers:
    """The ``launcher/sweep.py`` processes of one sweep, one after another (a killed one is followed
    by the same command); each writes its output to ``<logs>/driver<n>.out`` and ``.err``."""

    def __init__(self, args: list[str], logs: Path):
        self.args, self.logs, self.processes = args, logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self) -> subprocess.Popen:
        self.processes.append(self._spawn(f"driver{len(self.processes) + 1}"))
        return self.processes[-1]

    def _spawn(self, name: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "w") as out, open(self.logs / f"{name}.err", "w") as err:
            return subprocess.Popen(
                [sys.executable, str(REPO / "launcher" / "sweep.py"), *self.args],
                stdout=out, stderr=err, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )  # fmt: skip

    @property
    def current(self) -> subprocess.Popen:
        return self.processes[-1]

    def output(self, index: int, stream: str = "out") -> str:
        return (self.logs / f"driver{index + 1}.{stream}").read_text()


class Chaos:
    def __init__(
        self, faults: list[Fault], drivers: Drivers, sweep_dir: Path, cluster: Path, distributed: str
    ):
        self.faults, self.drivers, self.sweep_dir, self.cluster = faults, drivers, sweep_dir, cluster
        self.distributed = distributed  # the method whose jobs run two tasks
        self.name = sweep_dir.name  # the Slurm job name of the sweep's jobs
        self.first_rows: dict[
            tuple[str, str], int
        ] = {}  # (Slurm job, run dir) -> metrics rows when first seen
        self.hit: set[str] = set()
        self.start = 0.0

    # what is seen
    def jobs(self) -> dict[str, dict]:
        """sweep.json's jobs by name (written atomically: always whole)."""
        path = self.sweep_dir / "sweep.json"
        return {job["name"]: job for job in json.loads(path.read_text())["jobs"]} if path.is_file() else {}

    def slurm_states(self) -> dict[str, str]:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--states=all", f"--name={self.name}", "--format=%i|%T"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return dict(line.split("|", 1) for line in out.stdout.split()) if out.returncode == 0 else {}

    def active_run(self, job: str) -> Path:
        """The run directory the job trains in now: its pretraining until that has results."""
        pretrain = self.sweep_dir / job / "pretrain"
        if pretrain.is_dir() and not (pretrain / "results.json").is_file():
            return pretrain
        return self.sweep_dir / job

    def progress(self, job: str, slurm_job_id: str) -> int:
        """Training rows the job's active run logged since this Slurm job was first seen running."""
        run_dir = self.active_run(job)
        rows = _rows(run_dir)
        return rows - self.first_rows.setdefault((slurm_job_id, str(run_dir)), rows)

    def observe(self) -> tuple[dict[str, str], dict[str, str]]:
        """(job -> its Slurm job id, job -> Slurm state) for the jobs of the sweep without results."""
        states = self.slurm_states()
        ids = {
            name: job["slurm_job_id"]
            for name, job in self.jobs().items()
            if job["slurm_job_id"] and not (self.sweep_dir / name / "results.json").is_file()
        }
        seen = {name: states[i].split()[0] for name, i in ids.items() if i in states}
        for name, state in seen.items():
            if state == "RUNNING":
                self.progress(name, ids[name])
        return ids, seen

    # the loop
    def run(self, timeout: float = 1500) -> None:
        deadline = time.monotonic() + timeout
        while not any(state == "RUNNING" for state in self.observe()[1].values()):
            self._check_alive(deadline, "the first job to run")
            time.sleep(0.2)
        self.start = time.monotonic()
        while waiting := [f for f in self.faults if f.fired_s is None]:
            self._check_alive(deadline, ", ".join(f.kind for f in waiting))
            ids, seen = self.observe()
            now = time.monotonic() - self.start
            for fault in waiting:
                if now >= fault.not_before and self._fire(fault, ids, seen):
                    fault.fired_s = time.monotonic() - self.start
                    fault.active = sorted(seen)
                    break
            time.sleep(0.2)

    def _check_alive(self, deadline: float, what: str) -> None:
        driver = self.drivers.current
        if driver.poll() is not None:
            raise AssertionError(
                f"the sweep driver ended (exit {driver.returncode}) while chaos waited for {what}:\n"
                + self.drivers.output(len(self.drivers.processes) - 1, "err")[-3000:]
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"chaos: no moment for {what} within the time allowed")

    def _fire(self, fault: Fault, ids: dict[str, str], seen: dict[str, str]) -> bool:
        rank_kill_done = any(f.kind == KILL_RANK and f.fired_s is not None for f in self.faults)

        def candidates(state: str, distributed: bool | None = None, fresh: bool = True) -> list[str]:
            """Jobs in ``state`` (RUNNING ones with the fault's progress), not hit yet if ``fresh``,
            of the two-task method or not (None: either)."""
            return [
                name for name, s in sorted(seen.items())
                if s == state and not (fresh and name in self.hit)
                and (distributed is None or name.startswith(f"{self.distributed}-") == distributed)
                and (state != "RUNNING" or self.progress(name, ids[name]) >= fault.steps)
            ]  # fmt: skip

        if fault.kind == SECOND_DRIVER:
            return self._second_driver(fault)
        if fault.kind == KILL_DRIVER:
            if "RUNNING" not in seen.values() or "PENDING" not in seen.values():
                return False
            return self._kill_driver(fault, seen)
        if fault.kind == RESTART_SLURMD:
            return bool(candidates("RUNNING", fresh=False)) and self._restart_slurmd(fault)
        if fault.kind == KILL_RANK:
            return self._kill_rank(fault, candidates("RUNNING", distributed=True), ids)
        state = "PENDING" if fault.kind == SCANCEL_PENDING else "RUNNING"
        names = candidates(state, distributed=None if rank_kill_done else False)
        if fault.kind == SCANCEL_PENDING and not names:  # late: a pending two-task job will do,
            names = candidates(state)  # the rank kill has the other one (or the retry of this one)
        if not names:
            return False
        target = names[int(fault.pick * len(names))]
        command = ["scontrol", "requeue"] if fault.kind == REQUEUE_RUNNING else ["scancel"]
        done = subprocess.run([*command, ids[target]], capture_output=True, text=True, timeout=60)
        fault.target, fault.slurm_job_id = target, ids[target]
        fault.note = f"{' '.join(command)} {ids[target]} ({state.lower()})"
        fault.ok = done.returncode == 0
        if not fault.ok:
            fault.note += f": {done.stderr.strip()}"
        self.hit.add(target)
        return True

    # the faults
    def _second_driver(self, fault: Fault) -> bool:
        holder = self.drivers.current.pid
        second = self.drivers._spawn("second")
        try:
            code = second.wait(timeout=180)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
            code = None
        err = (self.drivers.logs / "second.err").read_text()
        lines = [line for line in err.splitlines() if line.strip()]
        expected = (
            f"error: sweep directory {self.sweep_dir} is in use by another launcher/sweep.py "
            f"(pid {holder} on {socket.gethostname()} since "
        )
        fault.ok = code == 2 and len(lines) == 1 and lines[0].startswith(expected)
        fault.note = f"exit {code}: {err.strip()[:400]}"
        return True

    def _kill_driver(self, fault: Fault, seen: dict[str, str]) -> bool:
        old = self.drivers.current
        old.send_signal(signal.SIGKILL)
        old.wait()
        time.sleep(fault.pick * 3)  # the jobs go on without a driver for a moment
        new = self.drivers.start()
        deadline = time.monotonic() + 180  # until it holds the sweep (a second driver is refused then)
        while not (self.sweep_dir / "sweep.lock").read_text().startswith(f"pid {new.pid} "):
            if new.poll() is not None or time.monotonic() > deadline:
                fault.ok, fault.note = (
                    False,
                    f"the driver started again (pid {new.pid}) did not take the sweep",
                )
                return True
            time.sleep(0.2)
        fault.note = (
            f"driver pid {old.pid} killed with {len(seen)} job(s) queued or running; started it again"
        )
        return True

    def _restart_slurmd(self, fault: Fault) -> bool:
        pid = int((self.cluster / "slurmd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid):
            if time.monotonic() > deadline:
                fault.ok, fault.note = False, f"slurmd (pid {pid}) did not stop within 60 s of SIGTERM"
                return True
            time.sleep(0.1)
        command = ["slurmd", "-f", os.environ["SLURM_CONF"], "-N", "localhost"]  # it daemonizes
        subprocess.run(command, check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            out = subprocess.run(["sinfo", "--noheader", "--nodes=localhost", "--format=%t"],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            if out.stdout.strip() in {"idle", "mix", "alloc"}:
                break
            if time.monotonic() > deadline:
                fault.ok, fault.note = False, f"node state {out.stdout.strip()!r} 60 s after slurmd restarted"
                return True
            time.sleep(0.2)
        fault.note = f"slurmd pid {pid} stopped and started again"
        return True

    def _kill_rank(self, fault: Fault, names: list[str], ids: dict[str, str]) -> bool:
        for target in names:
            ranks = rank_processes(self.active_run(target))
            if len(ranks) != 2:
                continue
            rank = int(fault.pick * 2)
            victim, other = ranks[rank], ranks[1 - rank]
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue  # it ended just now: another moment
            killed = time.monotonic()
            fault.target, fault.slurm_job_id = target, ids[target]
            self.hit.add(target)
            try:
                other.wait(timeout=OTHER_RANK_BOUND_S)
            except psutil.TimeoutExpired:
                fault.ok = False
                fault.note = f"rank {rank} killed; rank {1 - rank} (pid {other.pid}) still ran {OTHER_RANK_BOUND_S} s later"
                return True
            except psutil.NoSuchProcess:
                pass
            fault.note = f"rank {rank} (pid {victim.pid}) killed; rank {1 - rank} ended {time.monotonic() - killed:.1f} s later"
            return True
        return False


def rank_processes(run_dir: Path) -> dict[int, psutil.Process]:
    """The training processes of ``run_dir`` by rank (not their loader workers, forks with the same
    command line)."""
    argument = f"hydra.run.dir={run_dir.resolve()}"
    found = {}
    for process in psutil.process_iter(["cmdline", "ppid"]):
        command = process.info["cmdline"] or []
        if argument not in command or command[1:4] != ["-m", "memetrain", "train"]:  # a sweep job's training
            continue
        try:
            parent = psutil.Process(process.info["ppid"]).cmdline()
            if argument in parent:
                continue  # a loader worker
            found[int(process.environ().get("RANK", "0"))] = process
        except psutil.Error:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"train/loss"' in line)
