"""launcher=slurm on a real one-node cluster (slurm/start_cluster.sh): a sweep as one job array
in which a preempted job is requeued, skips its finished pretraining and ends with the weights of
the job nobody interrupted, then a re-run that skips both; and an array task that is a two-process
distributed run, signalled past its requeue bound, listed as failed with its log, and resumed by a
re-run from the checkpoint both ranks saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from safetensors.torch import load_file

from tests.helpers import REPO
from tests.sweep.sweeps import CLIP, FUSION_FROM, tiny_sweep

pytestmark = pytest.mark.slow

# Runs long enough that the signal, sent once step 2 is logged, lands mid-training on a fast machine
# too (a 12-step run could finish first), checkpointing and validating rarely so the length is cheap.
FUSION_STEPS, TEXT_STEPS = 48, 240
RARE = "'trainer.log_every=1','trainer.checkpoint_every=40','trainer.val_every=1000'"
SLURM = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.time_minutes=10", "launcher.poll_seconds=1",
         "launcher.signal_delay_s=30", "launcher.stop_timeout_s=20"]  # fmt: skip


def start_sweep(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "launcher" / "sweep.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip


def wait_until(condition, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def training_step(run_dir: Path) -> int:
    """The newest step logged by the run (0 before its first row)."""
    path = run_dir / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.is_file() else []
    return json.loads(rows[-1])["step"] if rows else 0


def slurm_job(sweep_dir: Path, name: str) -> submitit.SlurmJob:
    jobs = {job["name"]: job for job in json.loads((sweep_dir / "sweep.json").read_text())["jobs"]}
    return submitit.SlurmJob(folder=sweep_dir / "slurm", job_id=jobs[name]["slurm_job_id"])


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_a_job_array_with_a_preempted_job_requeued_to_the_same_result(slurm_cluster, synth_shards, tmp_path):
    pretrain = [*CLIP["train"], "trainer.max_steps=3", "eval.protocols=[linear_probe]"]
    methods = {"fusion": {"pretrain": pretrain, "train": FUSION_FROM["<pretrain>"]}}
    args = tiny_sweep(tmp_path, synth_shards, methods, axes={"copy": {"a": [], "b": []}}, steps=FUSION_STEPS)
    args += [*SLURM, f"overrides=[{RARE}]"]
    sweep_dir = tmp_path / "runs" / "tiny"
    run_a, run_b = sweep_dir / "fusion-a-seed0", sweep_dir / "fusion-b-seed0"
    sweep = start_sweep(args)
    wait_until(lambda: training_step(run_a) >= 2, "job a's fine-tuning to be under way")
    job = slurm_job(sweep_dir, "fusion-a-seed0")
    job._interrupt(timeout=False)  # submitit's preemption path: SIGTERM and SIGUSR2 to the job
    code, out, err = finish(sweep)
    assert code == 0, err[-3000:]
    assert "Requeued job" in job.paths.stdout.read_text()
    assert stops(run_a) == 1 and _log(run_a).count("resumed from") == 1
    assert _log(run_a / "pretrain").count("\n") == _log(run_b / "pretrain").count("\n"), (
        "pretraining ran once"
    )
    ours, theirs = (
        load_file(d / "checkpoints" / f"step_{FUSION_STEPS:07d}" / "model.safetensors")
        for d in (run_a, run_b)
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    results = [json.loads((d / "results.json").read_text())["protocols"] for d in (run_a, run_b)]
    assert results[0] == results[1]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert {j["name"]: j["status"] for j in record["jobs"]} == {
        "fusion-a-seed0": "done",
        "fusion-b-seed0": "done",
    }
    assert {j["slurm_job_id"].split("_")[0] for j in record["jobs"]} == {job.job_id.split("_")[0]}, (
        "one array"
    )

    code, out, err = finish(start_sweep(args))
    assert code == 0 and "sweep tiny: 2 jobs, 2 with results (skipped), 0 to run" in out, err[-3000:]


def test_a_distributed_array_task_past_its_requeue_bound_fails_and_a_rerun_resumes_it(
    slurm_cluster, synth_shards, tmp_path
):
    args = tiny_sweep(tmp_path, synth_shards, {"text": {"train": ["model=lstm"]}}, steps=TEXT_STEPS)
    args += [*SLURM, "launcher.tasks_per_node=2", "launcher.max_requeues=0"]
    args += [f"overrides=['data.batch_size=8','data.num_workers=1',{RARE}]"]
    sweep_dir, run_dir = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny" / "text-seed0"
    sweep = start_sweep(args)
    wait_until(lambda: training_step(run_dir) >= 2, "the two-process training to be under way")
    job = slurm_job(sweep_dir, "text-seed0")
    job._interrupt(timeout=True)  # submitit's time-limit path: SIGUSR2 to every task
    code, out, err = finish(sweep)
    assert code == 2 and "error: 1 of 1 jobs of sweep tiny failed" in err, err[-3000:]
    # the bounds: ours (max_requeues) and submitit's count of timeouts (max_num_timeout), both 0 here
    assert (
        "  failed text-seed0: text-seed0: requeued 0 times (launcher.max_requeues), not requeued again."
        in out
    )
    assert f"    log: {job.paths.stdout}" in out
    assert (
        "text-seed0: requeued 0 times (launcher.max_requeues), not requeued again."
        in job.paths.stdout.read_text()
    )
    # past its requeue bound: sweep.json reports it with its cause, and the sweep did not retry it
    entry = json.loads((sweep_dir / "sweep.json").read_text())["jobs"][0]
    assert (entry["cause"], entry["retries"], entry["history"][-1]["then"]) == ("time_limit", 0, "reported")
    assert stops(run_dir) == 1, "both ranks stopped at one step and saved"
    stopped_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert {"trainer_state_0.json", "trainer_state_1.json"} <= {
        p.name for p in (run_dir / "checkpoints" / f"step_{stopped_at:07d}").iterdir()
    }

    code, out, err = finish(start_sweep(args))
    assert code == 0, err[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:07d}'}" in _log(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == TEXT_STEPS


def stops(run_dir: Path) -> int:
    """How often the run checkpointed on a signal and stopped (Slurm delivers SIGTERM and SIGUSR2 in
    either order, and the first one received is logged)."""
    return _log(run_dir).count("; stopping (the same command resumes from it)")


def _log(run_dir: Path) -> str:
    path = run_dir / "train.log"
    return path.read_text() if path.is_file() else ""
