"""launcher=local end to end: stages in order, <after> weights filled in, sweep.json, skipping
finished jobs on a re-run, and failures listed with their logs without running their dependents."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_launcher
from tests.sweep.sweeps import CLIP, FUSION_FROM, tiny_sweep

pytestmark = pytest.mark.slow

METHODS = {"clip": CLIP, "fusion": {"after": "clip", "train": FUSION_FROM["<after>"]}}


def test_stages_run_in_order_and_a_rerun_skips_jobs_with_results(synth_shards, tmp_path):
    args = tiny_sweep(tmp_path, synth_shards, METHODS)
    first = run_launcher("sweep.py", *args, "launcher=local")
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "tiny"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["sweep"] == "tiny" and record["launcher"] == "local"
    jobs = {job["name"]: job for job in record["jobs"]}
    assert list(jobs) == ["clip-seed0", "fusion-seed0"]
    assert jobs["fusion-seed0"]["after"] == "clip-seed0" and jobs["fusion-seed0"]["stage"] == 1
    assert {job["status"] for job in jobs.values()} == {"done"}
    assert jobs["clip-seed0"]["group"] == {"method": "clip"} and jobs["clip-seed0"]["seed"] == 0
    for name, method in (("clip-seed0", "clip"), ("fusion-seed0", "supervised")):
        results = json.loads((sweep_dir / name / "results.json").read_text())
        assert results["method"] == method and results["steps"] == 6 and results["seed"] == 0
        assert (sweep_dir / name / "config.yaml").is_file() and (sweep_dir / name / "train.log").is_file()
        assert jobs[name]["log"] == str(sweep_dir / name / "job.log")
    weights = sweep_dir / "clip-seed0" / "checkpoints" / "step_0000006" / "model.safetensors"
    assert f"path: {weights}" in (sweep_dir / "fusion-seed0" / "config.yaml").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/results.json")}
    logs = {p: p.read_text() for p in sweep_dir.glob("*/job.log")}
    again = run_launcher("sweep.py", *args, "launcher=local")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep tiny: 2 jobs, 2 with results (skipped), 0 to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.read_text() for p in logs} == logs, "nothing ran again"


def test_a_failed_job_is_listed_with_its_log_and_what_needs_it_does_not_run(synth_shards, tmp_path):
    args = tiny_sweep(tmp_path, synth_shards, METHODS)
    result = run_launcher(
        "sweep.py", *args, "launcher=local", f"overrides=['data.shards={tmp_path / 'nowhere'}']"
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "error: 2 of 2 jobs of sweep tiny failed (listed above with their logs); fix the cause and run the "
        "same command again: jobs with results are skipped"
    )
    log = tmp_path / "runs" / "tiny" / "clip-seed0" / "job.log"
    assert (
        f"  failed clip-seed0: JobFailed: {tmp_path / 'runs' / 'tiny' / 'clip-seed0'}: training failed with exit code 2"
        in result.stdout
    )
    assert f"    log: {log}" in result.stdout
    assert "  failed fusion-seed0: needs clip-seed0, which has no results" in result.stdout
    assert "error: " in log.read_text() and "nowhere" in log.read_text()
    assert not (tmp_path / "runs" / "tiny" / "fusion-seed0").exists()
