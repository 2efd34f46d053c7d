"""Config and CLI faults through the real entry points: wrong options, unwritable directories, and a
disk that fills up while a checkpoint or a shard is written. Expected: one ``error:`` line naming the
option or file, exit code 2, and nothing half-written left looking whole (the previous checkpoint
stays the newest and loads; a failed pack leaves no shard and no manifest).

Also covered elsewhere, not repeated here: unknown method, unknown key, missing shards path,
``data.label_fraction=0``, a global batch that is no multiple of the batch, ``resume=maybe``
(tests/engine/test_train_run.py::test_config_errors_are_one_clear_line); unknown source and a missing
pack input (tests/data/test_pack.py::test_cli_errors_are_one_clear_line).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from memetrain.engine.distributed import check_trainer
from memetrain.engine.trainer import TrainerSettings, accumulation_steps
from memetrain.errors import ConfigError
from memetrain.run import train_and_evaluate
from tests.faults.conftest import assert_one_clear_error, assert_same_weights, fault_run_overrides
from tests.helpers import REPO, run_launcher


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: no directory can be made below it, even by root."""
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


CLI_CASES = [
    pytest.param(["data.label_fraction=1.5"], "error: label_fraction must be in (0, 1]; got 1.5", id="label fraction over 1"),
    pytest.param(["data.batch_size=512", "trainer.global_batch_size=512"],  # raised in a loader worker
                 "error: 185 samples cannot fill one batch of 512 on each of 2 rank x worker slots", id="batch larger than the split"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), CLI_CASES)
def test_a_bad_option_is_one_clear_error(synth_shards, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, run_dir), *overrides, timeout=240)
    assert_one_clear_error(result, message)
    assert not (run_dir / "checkpoints").exists()


def trainer_settings(**overrides) -> TrainerSettings:
    values = dict(
        max_steps=12, global_batch_size=16, lr=1e-3, min_lr=0.0, warmup_steps=2, weight_decay=0.05,
        weight_decay_end=0.05, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0, log_every=1, val_every=6,
        checkpoint_every=3, keep_checkpoints=2, max_nonfinite_steps=5, precision="no",
    )  # fmt: skip
    return TrainerSettings(**{**values, **overrides})


def trainer_config(**overrides) -> dict:
    """``configs/trainer/single.yaml`` with ``overrides``, checked as a run on this machine checks it."""
    config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "trainer" / "single.yaml"))
    check_trainer({**config, **overrides}, 1, torch.cuda.is_available())


IN_PROCESS_CASES = [
    pytest.param(lambda: trainer_settings(max_steps="ten"), "trainer.max_steps='ten': give a whole number", id="steps not a number"),
    pytest.param(lambda: trainer_settings(checkpoint_every=0), "trainer.checkpoint_every=0: give a whole number of at least 1", id="checkpoint every 0 steps"),
    pytest.param(lambda: trainer_settings(lr=-1.0), "trainer.lr=-1.0: give a number of at least 0", id="negative learning rate"),
    pytest.param(lambda: accumulation_steps(16, 0, 1), "data.batch_size=0: give a whole number of at least 1", id="batch size 0"),
    pytest.param(lambda: trainer_config(precision="fp8"), "trainer.precision='fp8': choose one of no, bf16, fp16", id="unknown precision"),
    pytest.param(lambda: trainer_config(precision="fp16"), "trainer.precision=fp16 needs a GPU", id="fp16 on a CPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param(lambda: train_and_evaluate(OmegaConf.create({"seed": "abc"}), Path("unused")), "seed='abc': give an integer", id="seed not an integer"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message"), IN_PROCESS_CASES)
def test_a_bad_value_names_its_option(build, message):
    """Checked in-process (the CLI turns every such ConfigError into one line, as the cases above show)."""
    with pytest.raises(ConfigError) as raised:
        build()
    assert message in str(raised.value)


@pytest.mark.slow
def test_a_run_directory_that_cannot_be_created_is_one_clear_error(synth_shards, a_file):
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, a_file / "run"), timeout=120)
    assert_one_clear_error(
        result, f"error: cannot write to {a_file}/run (Not a directory); set hydra.run.dir"
    )


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_clear_error(synth_shards, small_filesystem):
    read_only = small_filesystem("1m", read_only=True)
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, read_only / "run"), timeout=120)
    assert_one_clear_error(result, f"error: cannot write to {read_only}/run (Read-only file system)")


@pytest.mark.slow
def test_a_pack_output_that_cannot_be_created_is_one_clear_error(a_file):
    result = run_launcher("pack.py", "source=synth", "count=20", f"output={a_file}/out", timeout=120)
    assert_one_clear_error(result, f"error: cannot write to {a_file}/out (Not a directory); set output")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    synth_shards, reference_run, small_filesystem
):
    """16 MiB hold the run's logs and two 7 MB checkpoints (steps 3 and 6); the third fails."""
    run_dir = small_filesystem("16m") / "run"
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, run_dir), timeout=300)
    assert_one_clear_error(result, f"error: writing checkpoint {run_dir}/checkpoints/step_0000009 failed")
    assert "MiB are free there. Free space (or lower trainer.keep_checkpoints)" in result.stderr
    assert "it resumes from step_0000006" in result.stderr
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_0000003", "step_0000006"], "the failed write was left behind"
    assert_same_weights(
        reference_run / "checkpoints" / "step_0000006", run_dir / "checkpoints" / "step_0000006"
    )
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_a_full_disk_while_packing_leaves_no_shard_and_no_manifest(small_filesystem):
    output = small_filesystem("700k") / "pack"  # two of the train shards fit, then it is full
    result = run_launcher(
        "pack.py", "source=synth", "count=240", "image_size=64", "shard.max_samples=40", "workers=1",
        f"output={output}", timeout=180,
    )  # fmt: skip
    assert_one_clear_error(
        result, f"error: writing the pack to {output} failed (No space left on device); nothing was kept"
    )
    assert not [path.name for path in output.iterdir() if path.name != "pack.log"]
