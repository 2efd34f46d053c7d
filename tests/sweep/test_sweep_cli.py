"""launcher/sweep.py without running anything: the dry run's plan and the one-line errors."""

from __future__ import annotations

from tests.helpers import run_launcher


def test_dry_run_prints_every_job_its_runs_and_the_slurm_parameters(tmp_path):
    result = run_launcher(
        "sweep.py", "+sweep=table1", "dry_run=true", f"root={tmp_path}", "launcher.partition=gpu",
        "launcher.gpus_per_node=4", "launcher.tasks_per_node=4", "launcher.account=memes", "data=synth",
        "+launcher.additional_parameters.exclude=node01",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"sweep table1: 18 jobs (0 with results, skipped), 1 stage(s), in {tmp_path / 'table1'}" in out
    for flag in ("partition=gpu", "ntasks_per_node=4", "gpus_per_node=4", "account=memes", "time=240",
                 "array_parallelism=64", "signal_delay_s=120", "'exclude': 'node01'"):  # fmt: skip
        assert flag in out
    assert "stage 1 (one job array):" in out
    assert out.count("\n  dino-resnet50-") == 6 and "\n  cass-resnet50-384px-seed2\n" in out
    lines = out.splitlines()
    dino = lines.index("  dino-resnet50-224px-seed1")
    pretrain, train = lines[dino + 1], lines[dino + 2]
    assert pretrain.startswith("    pretrain: trainer.max_steps=3000 data.image_size=224 method=dino ")
    assert pretrain.endswith(" data=synth seed=1") and "data=hateful_memes" not in pretrain
    assert train.startswith(
        "    train: trainer.max_steps=3000 data.image_size=224 method=supervised model=resnet50 "
    )
    assert train.endswith(" trainer.lr=1.0e-4 data=synth seed=1")
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_errors_are_one_line():
    cases = [
        (
            [],
            "error: choose a sweep: +sweep=<name>, one of assignment, demo, mami, semimemes, synth_methods, table1, table2, table3",
        ),
        (["+sweep=demo", "launcher.stop_timeout_s=200"], "error: launcher.stop_timeout_s=200 must be below"),
    ]
    for args, message in cases:
        result = run_launcher("sweep.py", *args, "dry_run=true")
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
        assert "Traceback" not in result.stderr
