"""Sweeps under fire: a Slurm sweep of 8 short jobs (2 seeds x 4 rows: a two-task distributed LSTM,
CLIP with a linear probe, concat fusion, and CLIP pretraining then fusion from it) runs once
undisturbed and once beside the seeded chaos driver of ``tests/sweep/chaos.py``, which cancels a
running and a pending job, requeues a running one, SIGKILLs one rank of a two-task job, restarts
slurmd, SIGKILLs the sweep driver (the same command then re-attaches to its jobs) and starts a
second driver on the same directory (refused by the lock). The sweep under fire must end with
every job done, the same ``table.csv`` byte for byte (training resumes exactly on CPU), each run
directory holding its own config, every Slurm job submitted once per recorded attempt, and
``sweep.json`` saying how often each job was retried and why.

The figures (faults by kind, survived, runs lost, wall times) go to pytest's summary as a
``chaos`` section (tests/sweep/conftest.py). ``MEMETRAIN_CHAOS_SEED`` replays another plan.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from memetrain.sweep.launchers import _expand_ids
from tests.helpers import run_launcher
from tests.sweep.chaos import (
    KILL_DRIVER,
    KILL_RANK,
    PER_JOB,
    REQUEUE_RUNNING,
    RESTART_SLURMD,
    SCANCEL_PENDING,
    SCANCEL_RUNNING,
    SECOND_DRIVER,
    Chaos,
    Drivers,
    plan,
)
from tests.sweep.sweeps import FUSION_FROM, tiny_sweep

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("MEMETRAIN_CHAOS_SEED", "20"))
STEPS, PRETRAIN_STEPS = 16, 4
TINY_IMAGE = "model.image.name=test_resnet"  # timm's 0.4 M-parameter ResNet: image towers cost little
CLIP = ["method=clip", "model=clip_small", TINY_IMAGE, "eval=probe"]
METHODS = {
    "text": {"train": ["model=lstm"]},  # the two-task rows (launcher.methods below)
    "clip": {"train": [*CLIP, "eval.protocols=[linear_probe]"]},
    "concat": {"train": ["model=fusion_concat", TINY_IMAGE]},
    "fusion": {
        "pretrain": [*CLIP, f"trainer.max_steps={PRETRAIN_STEPS}", "eval.protocols=[]"],
        "train": [*FUSION_FROM["<pretrain>"], TINY_IMAGE],
    },
}
LAUNCHER = [
    "launcher=slurm", "launcher.cpus_per_task=1", "launcher.time_minutes=20", "launcher.poll_seconds=1",
    "launcher.signal_delay_s=30", "launcher.stop_timeout_s=20", "launcher.on_cancel=retry", "launcher.max_retries=2",
    "+launcher.methods.text.tasks_per_node=2", "launcher.setup=['export OMP_NUM_THREADS=1']",
]  # fmt: skip
# a metrics row per step (the chaos driver's clock), a checkpoint every 4 steps to resume from, no
# validation until the end; a collective or rendezvous that lost its peer gives up within minutes
RUNS = (
    "overrides=['data.num_workers=1','trainer.log_every=1','trainer.checkpoint_every=4','trainer.val_every=1000',"
    "'trainer.timeout_minutes=2','trainer.rendezvous_timeout_s=120']"
)
WAIT_S = 1800  # for a whole sweep on a loaded 2-core machine


@pytest.mark.timeout(2 * WAIT_S + 600)  # two sweeps and a re-run, past setup.cfg's 30 minutes per test
def test_a_sweep_under_fire_ends_as_the_undisturbed_one(
    slurm_cluster, synth_shards, tmp_path, record_property
):
    args = [a for a in tiny_sweep(tmp_path, synth_shards, METHODS, steps=STEPS) if a != "collect=false"]
    args += [*LAUNCHER, RUNS, "seeds=[0,1]"]
    calm_dir, chaos_dir = tmp_path / "runs" / "calm", tmp_path / "runs" / "chaos"

    started = time.monotonic()
    calm = run_launcher("sweep.py", *args, "name=calm", timeout=WAIT_S)
    calm_s = time.monotonic() - started
    assert calm.returncode == 0, calm.stderr[-3000:]
    names = sorted(job["name"] for job in _record(calm_dir).values())
    assert len(names) == 8 and all(_record(calm_dir)[n]["retries"] == 0 for n in names)

    started = time.monotonic()
    faults = plan(SEED)
    drivers = Drivers([*args, "name=chaos"], tmp_path / "drivers")
    drivers.start()
    chaos = Chaos(faults, drivers, chaos_dir, slurm_cluster, distributed="text")
    try:
        chaos.run(timeout=WAIT_S)
        code = drivers.current.wait(timeout=WAIT_S)
    except BaseException:
        fired = ", ".join(f"{f.kind} at {f.fired_s:.0f} s" for f in faults if f.fired_s is not None)
        record_property("chaos", f"seed {SEED}: stopped after {fired or 'no fault'} (see the error)")
        raise
    finally:
        for process in drivers.processes:
            if process.poll() is None:
                process.kill()
    chaos_s = time.monotonic() - started
    final_err = drivers.output(len(drivers.processes) - 1, "err")

    # the figures, before anything is asserted: CI shows them whatever fails below
    record = _record(chaos_dir)
    lost = [
        n
        for n in names
        if _protocols(chaos_dir / n) is None or _protocols(chaos_dir / n) != _protocols(calm_dir / n)
    ]
    survived = [f for f in faults if f.ok and _survived(f, drivers, code, lost)]
    by_kind = collections.Counter(f.kind for f in faults if f.fired_s is not None)
    retries = sum(job["retries"] for job in record.values())
    requeues = sum(job["requeues"] for job in record.values())
    table = _bytes(calm_dir / "table.csv")
    same_table = table is not None and _bytes(chaos_dir / "table.csv") == table
    line = (
        f"seed {SEED}: {sum(by_kind.values())} faults injected ("
        + ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items()))
        + f"), {len(survived)} survived, {len(lost)} runs lost; {retries} retries, {requeues} requeues; "
        + f"table.csv {'identical to' if same_table else 'DIFFERENT from'} the undisturbed sweep's; "
        + f"sweep under fire {chaos_s:.0f} s, undisturbed {calm_s:.0f} s"
    )
    record_property("chaos", line)
    print(f"\nchaos: {line}")
    for fault in faults:
        print(f"  {fault.kind} at {fault.fired_s or 0:.0f} s: {fault.target or '-'} {fault.note}")

    assert code == 0, f"the last driver exited {code}:\n{final_err[-3000:]}"
    assert all(f.fired_s is not None for f in faults)
    for fault in faults:
        assert fault.ok, f"{fault.kind}: {fault.note}"
    assert not lost, f"jobs without results equal to the undisturbed sweep's: {lost}"
    assert same_table, "table.csv differs from the undisturbed sweep's"
    assert len(survived) == len(faults), f"not survived: {[f.kind for f in faults if f not in survived]}"

    # sweep.json: every retry and requeue with its cause, and nothing the chaos did not cause
    hit = {f.target: f for f in faults if f.kind in PER_JOB}
    for name in names:
        job = record[name]
        retried = [e["cause"] for e in job["history"] if e["then"] == "retried"]
        assert job["status"] == "done" and job["retries"] == len(retried), job
        expected = {
            SCANCEL_RUNNING: ["cancelled"], SCANCEL_PENDING: ["cancelled"], KILL_RANK: ["killed"], REQUEUE_RUNNING: [],
        }.get(hit[name].kind if name in hit else None, [])  # fmt: skip
        assert retried == expected, f"{name}: retried for {retried}, expected {expected} ({job['history']})"
        if name in hit and hit[name].kind == REQUEUE_RUNNING:
            assert job["requeues"] >= 1 and job["history"][-1]["then"] == "resumed", job["history"]

    # each attempt was one Slurm job, and Slurm ran no job of the sweep that sweep.json does not name
    # (none submitted twice by a restarted driver, or by a retry); jobs an interrupted driver left
    # unrecorded were cancelled by the next one, which names them
    attempts = [job["slurm_job_id"] for job in record.values()]
    attempts += [
        e["slurm_job_id"] for job in record.values() for e in job["history"] if e["then"] == "retried"
    ]
    assert len(set(attempts)) == len(names) + retries, attempts
    found = [
        ids for out in _outputs(drivers) for ids in re.findall(r"^cancelled Slurm jobs ([^:]+):", out, re.M)
    ]
    unrecorded = _slurm_jobs("chaos") - set(attempts) - {i for ids in found for i in ids.split(", ")}
    assert not unrecorded, f"Slurm ran jobs of the sweep that sweep.json does not name: {unrecorded}"
    assert "re-attached to" in drivers.output(1), drivers.output(1)[-2000:]  # the driver after the kill

    # every run directory holds the config its job runs now, the one the undisturbed sweep ran
    for config in sorted(calm_dir.glob("*/**/config.yaml")):
        if ".hydra" in config.parts:
            continue
        ours = chaos_dir / config.relative_to(calm_dir)
        assert ours.read_text() == config.read_text().replace(str(calm_dir), str(chaos_dir)), ours
    again = run_launcher("sweep.py", *args, "name=chaos", timeout=600)
    assert again.returncode == 0 and "8 jobs, 8 with results (skipped), 0 to run" in again.stdout, (
        again.stderr
    )
    kept = _record(chaos_dir)  # a re-run keeps what the record says of each job
    assert all(kept[n]["history"] == record[n]["history"] and kept[n]["slurm_job_id"] for n in names), kept


def _survived(fault, drivers: Drivers, code: int | None, lost: list[str]) -> bool:
    """A per-job fault: its job ended with the undisturbed results; slurmd's restart: every job that
    ran then did; the killed driver: the next one re-attached and the sweep ended well; the second
    driver: refused (fault.ok)."""
    if fault.kind in PER_JOB:
        return fault.target is not None and fault.target not in lost
    if fault.kind == RESTART_SLURMD:
        return not set(fault.active) & set(lost)
    if fault.kind == KILL_DRIVER:
        return code == 0 and "re-attached to" in drivers.output(1)
    return fault.kind == SECOND_DRIVER


def _record(sweep_dir: Path) -> dict[str, dict]:
    return {job["name"]: job for job in json.loads((sweep_dir / "sweep.json").read_text())["jobs"]}


def _protocols(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text())["protocols"] if path.is_file() else None


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _outputs(drivers: Drivers) -> list[str]:
    return [drivers.output(i) for i in range(len(drivers.processes))]


def _slurm_jobs(name: str) -> set[str]:
    """Every Slurm job (array task) named ``name`` that accounting knows, requeues counted once."""
    out = subprocess.run(
        ["sacct", "--allocations", "--noheader", "--parsable2", f"--name={name}", "--starttime=2000-01-01",
         "--format=JobID"], capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return {task for line in out.stdout.split() for task in _expand_ids(line)}
