"""launcher/sweep.py without running anything: the dry run's plan and the one-line errors."""

from __future__ import annotations

from tests.helpers import REPO, run_launcher


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
    pretrain = lines[dino + 1]
    train = next(line for line in lines[dino + 2 :] if line.startswith("    train: "))
    assert pretrain.startswith("    pretrain: data.image_size=224 method=dino model=backbone_resnet50 ")
    assert pretrain.endswith(" data=synth seed=1") and "data=hateful_memes" not in pretrain
    # under each run: the weights it starts from, and the recipe it trains with
    assert lines[dino + 2] == "      weights: image <- resnet50: timm default tag"
    assert lines[dino + 3].startswith("      recipe: optimizer=sgd lr=0.0075 ")
    assert train.startswith("    train: data.image_size=224 method=supervised model=resnet50 ")
    assert train.endswith(" data=synth seed=1")
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_errors_are_one_line():
    cases = [
        (
            [],
            "error: choose a sweep: +sweep=<name>, one of "
            + ", ".join(sorted(path.stem for path in (REPO / "configs" / "sweep").glob("*.yaml"))),
        ),
        (["+sweep=demo", "launcher.stop_timeout_s=200"], "error: launcher.stop_timeout_s=200 must be below"),
    ]
    for args, message in cases:
        result = run_launcher("sweep.py", *args, "dry_run=true")
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
        assert "Traceback" not in result.stderr
