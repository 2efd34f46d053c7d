"""``launcher/sweep.py``: expand a sweep, run what has no results yet, stage by stage, wait, collect.

    python launcher/sweep.py +sweep=table2                          # Slurm, one job array
    python launcher/sweep.py +sweep=demo launcher=local              # here, one training at a time
    python launcher/sweep.py +sweep=table1 dry_run=true              # print the jobs, submit nothing
    python launcher/sweep.py +sweep=semimemes data=mami name=semimemes-mami seeds=[0,1,2,3,4]

Jobs with ``results.json`` are skipped, so re-running the command finishes a sweep after a failure;
a job directory whose recorded config differs from what the job would run now stops the sweep
before anything is skipped or submitted (``memetrain.sweep.reuse``).

One driver holds a sweep directory at a time (:mod:`memetrain.sweep.lock`). A driver started after
one that died re-attaches to the jobs it left queued or running (their Slurm job ids in
``sweep.json``); a job that ends without results for a cause outside its runs is submitted again
within ``launcher.max_retries`` (:mod:`memetrain.sweep.retry`). ``sweep.json`` is written before
each submission, naming the comment its jobs carry, and right after it with their ids, so jobs a
driver submitted in the instant before it died are found and cancelled, never run twice.
"""

from __future__ import annotations

import secrets
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from memetrain.errors import ConfigError, MemetrainError
from memetrain.run_record import finished
from memetrain.sweep import record, retry
from memetrain.sweep.grid import JobSpec, expand
from memetrain.sweep.launchers import build_launcher
from memetrain.sweep.lock import hold_sweep
from memetrain.sweep.monitor import wait
from memetrain.sweep.plan import describe_run
from memetrain.sweep.record import DONE, FAILED, PENDING, JobState
from memetrain.sweep.retry import REPORTED, REQUEUED, RESUMED, RETRIED
from memetrain.sweep.reuse import check_job_configs


class SweepFailed(MemetrainError):
    """Some jobs of a sweep ended without results."""


def run_sweep(cfg: DictConfig) -> None:
    if cfg.get("sweep") is None:
        sweeps = sorted(
            p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "sweep").glob("*.yaml")
        )
        raise ConfigError(f"choose a sweep: +sweep=<name>, one of {', '.join(sweeps)}")
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    data = HydraConfig.get().runtime.choices.get("data")  # data=<name>: a group choice, as in train.py
    jobs = expand(sweep, cfg.seeds, data, list(cfg.overrides))
    sweep_dir = Path(cfg.root, cfg.name).resolve()
    launcher = build_launcher(cfg.launcher, sweep_dir, cfg.name)
    launcher.check_methods({job.group["method"] for job in jobs})
    if cfg.dry_run:  # reads only: no lock
        record.check_unchanged(sweep_dir, record.load(sweep_dir), jobs)
        check_job_configs(sweep_dir, jobs)
        _print_plan(cfg.name, sweep_dir, launcher, jobs, _states(sweep_dir, jobs))
        return
    with hold_sweep(sweep_dir):  # one driver per sweep directory, until the tables are written
        _drive(cfg, sweep, jobs, sweep_dir, launcher)


def _states(sweep_dir: Path, jobs: list[JobSpec]) -> dict[str, JobState]:
    return {job.name: JobState(DONE if finished(sweep_dir / job.name) else PENDING) for job in jobs}


class _Driver:
    """What the driver knows of each job, and how it (re)submits them: sweep.json is written before
    a submission (with the comment its jobs will carry) and right after it (with their ids)."""

    def __init__(
        self, cfg: DictConfig, sweep: dict, jobs: list[JobSpec], sweep_dir: Path, launcher, previous
    ):
        self.cfg, self.jobs, self.sweep_dir, self.launcher = cfg, jobs, sweep_dir, launcher
        self.specs = {job.name: job for job in jobs}
        self.states = _states(sweep_dir, jobs)
        for name, state in self.states.items():  # a finished job keeps the log and Slurm job it ran as
            if state.status == DONE and name in previous:
                state.log, state.slurm_job_id = previous[name].get("log"), previous[name].get("slurm_job_id")
        self.histories = {job.name: list(previous.get(job.name, {}).get("history", [])) for job in jobs}
        self.header = {
            "sweep": cfg.name,
            "config": sweep["name"],
            "reference": sweep.get("reference"),
            "launcher": launcher.kind,
        }

    def save(self) -> None:
        record.write(self.sweep_dir, self.header, self.jobs, self.states, self.histories)

    def submit(self, specs: list[JobSpec]) -> list:
        comment = f"memetrain-sweep-{secrets.token_hex(6)}"
        self.header["submitting"] = {"comment": comment, "jobs": [spec.name for spec in specs]}
        self.save()
        handles = self.launcher.submit([self.launcher.job(spec) for spec in specs], comment)
        for handle in handles:
            self.states[handle.name] = JobState(PENDING, log=str(handle.log), slurm_job_id=handle.job_id)
        del self.header["submitting"]
        self.save()
        return handles

    def ended(self, handle, state: JobState):
        """A job ended: note how Slurm requeued it on the way; retry it, or report it."""
        name, history = handle.name, self.histories[handle.name]
        if handle.job_id is not None:
            history[:] = [
                e for e in history if not (e["cause"] == REQUEUED and e["slurm_job_id"] == handle.job_id)
            ]
            history += [
                retry.event(handle.job_id, retry.Ending(REQUEUED, detail), RESUMED)
                for detail in self.launcher.requeues(handle.job_id)
            ]
        if state.status == DONE or self.launcher.policy is None:
            return None
        ending = retry.Ending(state.cause, state.error)
        again, note = self.launcher.policy.decide(ending, history)
        if not again:
            history.append(retry.event(handle.job_id, ending, REPORTED))
            state.error = f"{state.error} ({note})" if note else state.error
            return None
        history.append(retry.event(handle.job_id, ending, RETRIED))
        return self.submit([self.specs[name]])[0]


def _drive(cfg: DictConfig, sweep: dict, jobs: list[JobSpec], sweep_dir: Path, launcher) -> None:
    header, previous = record.load_record(sweep_dir)
    record.check_unchanged(sweep_dir, previous, jobs)
    check_job_configs(sweep_dir, jobs)
    driver = _Driver(cfg, sweep, jobs, sweep_dir, launcher, previous)
    states = driver.states
    if header.get("submitting"):  # the driver before this one was killed while it submitted
        orphans = launcher.cancel_orphans(header["submitting"]["comment"])
        if orphans:
            print(
                f"cancelled Slurm jobs {', '.join(orphans)}: an interrupted driver submitted them but did not record them"
            )

    done = sum(states[job.name].status == DONE for job in jobs)
    print(
        f"sweep {cfg.name}: {len(jobs)} jobs, {done} with results (skipped), {len(jobs) - done} to run, in {sweep_dir}"
    )
    driver.save()
    start = time.monotonic()
    stages = sorted({job.stage for job in jobs})
    for stage in stages:
        todo = []
        for job in (job for job in jobs if job.stage == stage and states[job.name].status != DONE):
            if job.after and states[job.after].status != DONE:
                states[job.name] = JobState(FAILED, error=f"needs {job.after}, which has no results")
            else:
                todo.append(job)
        if not todo:
            continue
        handles = [h for job in todo if (h := _attach(launcher, job, previous.get(job.name)))]
        for handle in handles:  # waited for as they were; what became of them shows at the first poll
            old = previous[handle.name]
            states[handle.name] = JobState(old["status"], log=old.get("log"), slurm_job_id=handle.job_id)
        if handles:
            print(f"re-attached to {len(handles)} job(s) an earlier driver left in Slurm: " + ", ".join(
                f"{h.name} ({h.job_id})" for h in handles
            ))  # fmt: skip
        attached = {h.name for h in handles}
        fresh = [job for job in todo if job.name not in attached]
        if fresh:
            handles += driver.submit(fresh)
        driver.save()
        title = f"{cfg.name}" + (f" stage {stage + 1}/{len(stages)}" if len(stages) > 1 else "")
        try:
            with _interrupt_on_sigterm():
                wait(
                    handles, states, launcher.poll_seconds, launcher.refresh, driver.save, title, driver.ended
                )
        except KeyboardInterrupt:
            reason = launcher.interrupt()
            for handle in handles:
                states[handle.name] = handle.poll()
            driver.save()
            raise SweepFailed(f"sweep {cfg.name} interrupted: {reason}") from None
    driver.save()
    _report(cfg.name, sweep_dir, jobs, states, driver.histories, time.monotonic() - start)
    if cfg.collect:
        from memetrain.sweep.collect import OUTPUTS, collect_sweep

        print(collect_sweep(sweep_dir, reference=sweep.get("reference")))
        print(f"tables: {', '.join(str(sweep_dir / name) for name in OUTPUTS)}")
    print(f"per job: {sweep_dir}/<job>/results.json, plots/ (curves, ROC, confusion matrices), train.log")
    print(f"TensorBoard (every job's tb/): tensorboard --logdir {sweep_dir}")
    failed = [job.name for job in jobs if states[job.name].status == FAILED]
    if failed:
        raise SweepFailed(
            f"{len(failed)} of {len(jobs)} jobs of sweep {cfg.name} failed (listed above with their logs); "
            "fix the cause and run the same command again: jobs with results are skipped"
        )


@contextmanager
def _interrupt_on_sigterm():
    """SIGTERM (kill, a scheduler) interrupts the wait like Ctrl-C, so the sweep can stop cleanly."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _attach(launcher, job: JobSpec, previous: dict | None):
    """A job an earlier invocation submitted and left pending or running is waited for, never
    submitted twice: by its Slurm job id in sweep.json (if it ended meanwhile without results,
    the retry policy decides, as for a job this driver watched end). A job an earlier driver
    reported as failed is submitted anew: running the sweep again is the decision to retry."""
    if previous is None or previous.get("slurm_job_id") is None or previous["status"] in (DONE, FAILED):
        return None
    return launcher.attach(previous["slurm_job_id"], job)


def _print_plan(
    name: str, sweep_dir: Path, launcher, jobs: list[JobSpec], states: dict[str, JobState]
) -> None:
    done = sum(states[job.name].status == DONE for job in jobs)
    stages = sorted({job.stage for job in jobs})
    print(
        f"sweep {name}: {len(jobs)} jobs ({done} with results, skipped), {len(stages)} stage(s), in {sweep_dir}"
    )
    print(f"launcher {launcher.kind}: " + ", ".join(f"{k}={v}" for k, v in launcher.parameters().items()))
    common = launcher.parameters()
    for method in sorted({job.group["method"] for job in jobs}):
        own = {k: v for k, v in launcher.parameters(method).items() if common.get(k) != v}
        if own:
            print(f"  {method} jobs (own job array): " + ", ".join(f"{k}={v}" for k, v in own.items()))
    for stage in stages:
        print(f"stage {stage + 1}" + (" (one job array)" if launcher.kind == "slurm" else "") + ":")
        for job in (job for job in jobs if job.stage == stage):
            skipped = "  [has results: skipped]" if states[job.name].status == DONE else ""
            print(f"  {job.name}{skipped}")
            if job.after:
                print(f"    after: {job.after}")
            for relative, overrides in job.runs:
                print(f"    {'train' if relative == '.' else relative}: {' '.join(overrides)}")
                for line in describe_run(overrides):  # the weights it starts from, the recipe in effect
                    print(f"      {line}")


def _report(
    name: str,
    sweep_dir: Path,
    jobs: list[JobSpec],
    states: dict[str, JobState],
    histories: dict[str, list[dict]],
    seconds: float,
) -> None:
    failed = [job for job in jobs if states[job.name].status == FAILED]
    retries = sum(e["then"] == RETRIED for job in jobs for e in histories[job.name])
    requeues = sum(e["cause"] == REQUEUED for job in jobs for e in histories[job.name])
    print(
        f"sweep {name}: {len(jobs) - len(failed)} of {len(jobs)} jobs have results ({seconds / 60:.1f} min; "
        f"{retries} retries, {requeues} requeues by Slurm); run directories in {sweep_dir}, "
        f"job list in {sweep_dir / record.FILENAME}"
    )
    for job in jobs:
        history = histories[job.name]
        causes = [e["cause"] for e in history if e["then"] == RETRIED]
        requeued = sum(e["cause"] == REQUEUED for e in history)
        parts = [f"retried {len(causes)} time(s) ({', '.join(causes)})"] if causes else []
        parts += [f"requeued by Slurm {requeued} time(s)"] if requeued else []
        if parts:
            print(f"  {job.name}: {', '.join(parts)}")
    for job in failed:
        state = states[job.name]
        print(f"  failed {job.name}: {state.error}" + (f"\n    log: {state.log}" if state.log else ""))
