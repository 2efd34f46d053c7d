"""``launcher/sweep.py``: expand a sweep, run what has no results yet, stage by stage, wait, collect.

    python launcher/sweep.py +sweep=table2                          # Slurm, one job array
    python launcher/sweep.py +sweep=demo launcher=local              # here, one training at a time
    python launcher/sweep.py +sweep=table1 dry_run=true              # print the jobs, submit nothing
    python launcher/sweep.py +sweep=semimemes data=mami name=semimemes-mami seeds=[0,1,2,3,4]

Jobs with ``results.json`` are skipped, so re-running the command finishes a sweep after a failure.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from memetrain.errors import ConfigError, MemetrainError
from memetrain.sweep import record
from memetrain.sweep.grid import JobSpec, expand
from memetrain.sweep.launchers import build_launcher
from memetrain.sweep.monitor import wait
from memetrain.sweep.record import DONE, FAILED, PENDING, JobState


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
    previous = record.load(sweep_dir)
    record.check_unchanged(sweep_dir, previous, jobs)
    states = {
        job.name: JobState(DONE if (sweep_dir / job.name / "results.json").is_file() else PENDING)
        for job in jobs
    }
    if cfg.dry_run:
        _print_plan(cfg.name, sweep_dir, launcher, jobs, states)
        return

    done = sum(states[job.name].status == DONE for job in jobs)
    print(
        f"sweep {cfg.name}: {len(jobs)} jobs, {done} with results (skipped), {len(jobs) - done} to run, in {sweep_dir}"
    )
    header = {
        "sweep": cfg.name,
        "config": sweep["name"],
        "reference": sweep.get("reference"),
        "launcher": launcher.kind,
    }
    save = lambda: record.write(sweep_dir, header, jobs, states)  # noqa: E731
    save()
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
        attached = {h.name for h in handles}
        fresh = [launcher.job(job) for job in todo if job.name not in attached]
        if fresh:
            handles += launcher.submit(fresh)
        for handle in handles:
            states[handle.name] = handle.poll()
        save()
        title = f"{cfg.name}" + (f" stage {stage + 1}/{len(stages)}" if len(stages) > 1 else "")
        try:
            with _interrupt_on_sigterm():
                wait(handles, states, launcher.poll_seconds, launcher.refresh, save, title)
        except KeyboardInterrupt:
            reason = launcher.interrupt()
            for handle in handles:
                states[handle.name] = handle.poll()
            save()
            raise SweepFailed(f"sweep {cfg.name} interrupted: {reason}") from None
    save()
    _report(cfg.name, sweep_dir, jobs, states, time.monotonic() - start)
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
    """A job an earlier invocation submitted and Slurm still runs is waited for, not submitted twice."""
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
    for stage in stages:
        print(f"stage {stage + 1}" + (" (one job array)" if launcher.kind == "slurm" else "") + ":")
        for job in (job for job in jobs if job.stage == stage):
            skipped = "  [has results: skipped]" if states[job.name].status == DONE else ""
            print(f"  {job.name}{skipped}")
            if job.after:
                print(f"    after: {job.after}")
            for relative, overrides in job.runs:
                print(f"    {'train' if relative == '.' else relative}: {' '.join(overrides)}")


def _report(
    name: str, sweep_dir: Path, jobs: list[JobSpec], states: dict[str, JobState], seconds: float
) -> None:
    failed = [job for job in jobs if states[job.name].status == FAILED]
    print(
        f"sweep {name}: {len(jobs) - len(failed)} of {len(jobs)} jobs have results ({seconds / 60:.1f} min); "
        f"run directories in {sweep_dir}, job list in {sweep_dir / record.FILENAME}"
    )
    for job in failed:
        state = states[job.name]
        print(f"  failed {job.name}: {state.error}" + (f"\n    log: {state.log}" if state.log else ""))
