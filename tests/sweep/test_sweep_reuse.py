"""A sweep run again reuses a job directory only if the job would run the config recorded there
(memetrain/sweep/reuse.py): a finished job whose recorded config differs is never skipped as done."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memetrain.sweep.grid import PRETRAIN, expand, fill_weights
from tests.helpers import REPO, run_launcher


def sweep_jobs(name: str):
    sweep = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "sweep" / f"{name}.yaml"), resolve=True)
    return {job.name: job for job in expand(sweep, data="synth")}


def record_run(run_dir: Path, overrides: list[str], **changes) -> None:
    """Write the ``config.yaml`` and ``results.json`` a finished run of ``overrides`` leaves,
    with dotted ``changes`` (``trainer__lr=...``) applied to the config."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "results.json").write_text(json.dumps({"protocols": {}}))


def dry_run(sweep: str, root: Path):
    return run_launcher("sweep.py", f"+sweep={sweep}", "data=synth", "dry_run=true", f"root={root}")


def test_a_finished_job_whose_config_changed_is_refused_not_skipped(tmp_path):
    jobs = sweep_jobs("demo")
    same, changed = jobs["image_only-resnet18-seed0"], jobs["image_only-resnet18-seed1"]
    record_run(tmp_path / "demo" / same.name, same.overrides)
    record_run(tmp_path / "demo" / changed.name, changed.overrides, trainer__lr=0.0123)

    refused = dry_run("demo", tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith(
        f"error: {tmp_path}/demo/{changed.name}/config.yaml was made with another config "
        "(trainer.lr: 0.0123 there, 0.001 now). The sweep's configs changed since job "
    ), refused.stderr
    assert "another name=" in refused.stderr and f"move {tmp_path}/demo/{changed.name} away" in refused.stderr

    record_run(tmp_path / "demo" / changed.name, changed.overrides)
    accepted = dry_run("demo", tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert f"  {same.name}  [has results: skipped]" in accepted.stdout
    assert f"  {changed.name}  [has results: skipped]" in accepted.stdout


def test_weights_the_sweep_fills_in_are_not_compared(tmp_path):
    """A fine-tuning run records the path of its own job's pretraining weights, which its
    overrides name only as ``<pretrain>``; both runs' configs are compared otherwise."""
    job = sweep_jobs("table1")["dino-resnet50-224px-seed0"]
    job_dir = tmp_path / "table1" / job.name
    weights = job_dir / "pretrain" / "checkpoints" / "step_0003000" / "model.safetensors"
    assert any(PRETRAIN in override for override in job.overrides)
    record_run(job_dir / "pretrain", job.pretrain)
    record_run(job_dir, fill_weights(job.overrides, {PRETRAIN: weights}))
    assert dry_run("table1", tmp_path).returncode == 0

    record_run(job_dir / "pretrain", job.pretrain, method__out_dim=1024)
    refused = dry_run("table1", tmp_path)
    assert (
        refused.returncode == 2
        and f"{job.name}/pretrain/config.yaml was made with another config" in refused.stderr
    )
    assert "method.out_dim: 1024 there" in refused.stderr


def test_a_damaged_results_file_is_no_finished_job(tmp_path):
    jobs = sweep_jobs("demo")
    job = jobs["image_only-resnet18-seed0"]
    record_run(tmp_path / "demo" / job.name, job.overrides)
    (tmp_path / "demo" / job.name / "results.json").write_text('{"protocols": {"classifier"')  # cut off
    result = dry_run("demo", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"  {job.name}\n" in result.stdout and "0 with results" in result.stdout, "it runs again"
