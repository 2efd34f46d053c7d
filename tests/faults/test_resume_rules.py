"""A run directory belongs to one config: a command that changes an option that can change results
is refused and leaves the run untouched; bookkeeping options may change and the resume stays exact;
``resume=never`` starts over and keeps the old run; ``resume=<checkpoint>`` continues from it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from memetrain.sweep.runs import find_jobs
from tests.faults.conftest import assert_one_clear_error, assert_same_weights, fault_run_overrides
from tests.helpers import run_launcher

pytestmark = pytest.mark.slow


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with the sha256 of its content."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def copied_run(reference_run, tmp_path) -> Path:
    """The finished reference run (12 steps, checkpoints 3, 6, 9, 12), copied with its .hydra/."""
    return Path(shutil.copytree(reference_run, tmp_path / "run"))


def test_a_changed_learning_rate_is_refused_and_the_run_left_as_it_was(synth_shards, copied_run):
    before = snapshot(copied_run)
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, copied_run), "trainer.lr=0.0123")
    assert_one_clear_error(
        result,
        f"error: {copied_run}/config.yaml was made with another config (trainer.lr: 0.001 there, 0.0123 now)",
    )
    assert "add resume=never (the old run is moved to" in result.stderr
    assert "hydra.run.dir=" in result.stderr
    assert snapshot(copied_run) == before, "the refused command wrote into the run directory"


def test_bookkeeping_options_may_change_and_the_resume_stays_exact(synth_shards, copied_run, reference_run):
    for late in ("step_0000009", "step_0000012"):
        shutil.rmtree(copied_run / "checkpoints" / late)
    (copied_run / "results.json").unlink()
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, copied_run),
        "trainer.log_every=2", "trainer.checkpoint_every=4", "data.worker_kind=thread",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "step_0000006 (step 6)" in result.stderr
    assert_same_weights(
        reference_run / "checkpoints" / "step_0000012", copied_run / "checkpoints" / "step_0000012"
    )
    assert "log_every: 2" in (copied_run / "config.yaml").read_text()  # the record says how it ran last


def test_resume_never_starts_over_and_keeps_the_old_run(synth_shards, copied_run):
    before = snapshot(copied_run)
    result = run_launcher(
        "train.py",
        *fault_run_overrides(synth_shards, copied_run, steps=3),
        "trainer.lr=0.0123",
        "resume=never",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [previous] = (copied_run / "previous").iterdir()
    assert f"resume=never: the earlier run in {copied_run} was moved to {previous}" in result.stderr
    assert snapshot(previous) == before, "the earlier run was not kept whole"
    assert "lr: 0.0123" in (copied_run / "config.yaml").read_text()
    assert sorted(p.name for p in (copied_run / "checkpoints").iterdir()) == ["step_0000003"]
    results = json.loads((copied_run / "results.json").read_text())
    assert results["steps"] == 3
    assert results["checkpoint"] == {
        "selected": "last",
        "step": 3,
        "path": "checkpoints/step_0000003",
        "trained_steps": 3,
        "stopped_early": False,
    }
    [job] = find_jobs(copied_run.parent)[0]  # the collector names it from the .hydra/ record
    assert job.settings["method"] == "supervised" and job.settings["trainer.lr"] == "0.0123"


def test_resume_from_a_chosen_checkpoint_then_requeued(synth_shards, reference_run, tmp_path):
    run_dir = tmp_path / "continued"
    chosen = reference_run / "checkpoints" / "step_0000006"
    command = [*fault_run_overrides(synth_shards, run_dir), f"resume={chosen}"]
    result = run_launcher("train.py", *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {chosen} (step 6)" in result.stderr
    assert_same_weights(
        reference_run / "checkpoints" / "step_0000012", run_dir / "checkpoints" / "step_0000012"
    )
    assert (
        json.loads((run_dir / "results.json").read_text())["checkpoint"]["path"] == "checkpoints/step_0000012"
    )

    again = run_launcher("train.py", *command)  # a requeued job: the same command once more
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing from this run's own newer checkpoint" in again.stderr
    assert f"resumed from {run_dir}/checkpoints/step_0000012 (step 12)" in again.stderr


def test_resume_from_a_run_of_another_config_is_refused(synth_shards, reference_run, tmp_path):
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, tmp_path / "other"), "trainer.warmup_steps=3",
        f"resume={reference_run}",
    )  # fmt: skip
    assert_one_clear_error(
        result,
        f"error: {reference_run}/checkpoints/step_0000012/config.yaml was made with another config "
        "(trainer.warmup_steps: 2 there, 3 now)",
    )


def test_resume_names_something_that_is_no_checkpoint(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, tmp_path / "run"), f"resume={tmp_path}"
    )
    assert_one_clear_error(result, f"error: resume='{tmp_path}': choose auto")
