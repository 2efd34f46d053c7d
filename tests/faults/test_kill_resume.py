"""SIGKILL of ``launcher/train.py`` at five seeded points, one of them while a checkpoint is being
written, each followed by a plain re-run (resume=auto): every checkpoint and the final weights are
``torch.equal`` to an uninterrupted run's, and a checkpoint cut off mid-write never replaces the
previous good one.

Kill points are read from the run directory as a user would see it: "after step k" is the moment
``metrics.jsonl`` gets its row for step k (the process is then validating, saving or in step k+1);
"during the write of checkpoint N" is the moment ``checkpoints/.step_N.tmp`` exists. A write that
finishes before the poll sees it is a missed kill point and is retried at the next checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.faults.conftest import STEPS, assert_same_weights, fault_run_overrides
from tests.helpers import REPO

pytestmark = pytest.mark.slow

CHECKPOINT_EVERY = 3
POLL_SECONDS = 0.002


def kill_schedule(seed: int = 7) -> list[tuple[str, int]]:
    """Four kills after random steps before the third checkpoint, then one during its write."""
    steps = sorted(random.Random(seed).sample(range(1, 9), 4))
    return [("after_step", step) for step in steps] + [("during_write", 9)]


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a training row in metrics.jsonl (a half-written last line is not one yet)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train/loss" in row:
                steps.append(row["step"])
    return steps


def complete_checkpoints(run_dir: Path) -> list[Path]:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith("step_"))


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # SIGKILL the whole group: the loader workers die with the trainer
    )


def wait_and_kill(process: subprocess.Popen, run_dir: Path, kind: str, step: int) -> int:
    """SIGKILL the run at the kill point. Returns the step of the kill point: for a write, the
    checkpoint whose temporary directory was seen (a later one if writes finished unseen)."""
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {kind} {step}"
        assert time.monotonic() < deadline, f"no {kind} {step} within 240 s"
        if kind == "after_step" and max(logged_steps(run_dir), default=0) >= step:
            break
        if kind == "during_write":
            if (run_dir / "checkpoints" / f".step_{step:07d}.tmp").exists():
                break
            if (run_dir / "checkpoints" / f"step_{step:07d}").exists():  # missed: try the next one
                step += CHECKPOINT_EVERY
                assert step <= STEPS, "every checkpoint write finished between two polls"
        time.sleep(POLL_SECONDS)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return step


def check_kept_checkpoints(run_dir: Path, reference_run: Path) -> list[Path]:
    """Whatever a kill hit, what looks complete is complete and right."""
    kept = complete_checkpoints(run_dir)
    for checkpoint in kept:
        assert_same_weights(reference_run / "checkpoints" / checkpoint.name, checkpoint)
    return kept


def test_sigkill_at_five_points_then_resume_ends_with_identical_weights(
    synth_shards, reference_run, tmp_path
):
    run_dir = tmp_path / "killed"
    command = [
        sys.executable,
        str(REPO / "launcher" / "train.py"),
        *fault_run_overrides(synth_shards, run_dir),
    ]
    history = []
    for kind, step in kill_schedule():
        while True:
            logged = max(logged_steps(run_dir), default=0)  # rows up to here may be stale ones
            target = step if kind == "during_write" else max(step, logged + 1)
            killed_at = wait_and_kill(start(command), run_dir, kind, target)
            history.append(f"{kind} {killed_at}: died after step {max(logged_steps(run_dir), default=0)}")
            assert not (run_dir / "results.json").exists()
            kept = check_kept_checkpoints(run_dir, reference_run)
            if kind == "after_step":
                break
            cut = run_dir / "checkpoints" / f".step_{killed_at:07d}.tmp"
            if cut.exists():  # killed mid-write: the previous checkpoint is still the newest
                assert not (run_dir / "checkpoints" / f"step_{killed_at:07d}").exists(), history
                assert kept[-1].name == f"step_{killed_at - CHECKPOINT_EVERY:07d}", history
                break
            step = killed_at + CHECKPOINT_EVERY  # the write ended between the poll and the kill
            assert step <= STEPS, f"no kill landed inside a checkpoint write: {history}"

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert (run_dir / "train.log").read_text().count("resumed from") >= 3, history
    kept = check_kept_checkpoints(run_dir, reference_run)
    expected_names = [f"step_{s:07d}" for s in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)]
    assert [p.name for p in kept] == expected_names, history
    final = f"checkpoints/step_{STEPS:07d}/optimizer.bin"
    expected = torch.load(reference_run / final, weights_only=True)["state"]
    got = torch.load(run_dir / final, weights_only=True)["state"]
    assert all(torch.equal(expected[i][k], got[i][k]) for i in expected for k in expected[i]), history
    assert logged_steps(run_dir) == list(range(1, STEPS + 1)), "rows of killed runs were kept or lost"
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "the cut-off write was not cleaned up"
