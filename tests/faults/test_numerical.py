"""Numerical faults in real runs: a NaN loss, or a finite loss with an infinite gradient, at chosen
steps (injected by the test-only ``faulty_supervised`` method; see faulty_methods.py).

Expected: the step is skipped (the optimizer does not move), counted in ``results.json`` and the
metrics, and warned about; more than ``trainer.max_nonfinite_steps`` in a row stop the run with one
clear error. fp16 loss scaling exists only on CUDA (Accelerate has no CPU scaler and
``build_accelerator`` refuses fp16 on CPU), so its test runs only where a GPU is.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.conftest import assert_one_clear_error, fault_run_overrides, run_faulty

pytestmark = pytest.mark.slow

STEPS = 8


def faulty_run(shards, run_dir, *overrides: str):
    return run_faulty(
        *fault_run_overrides(shards, run_dir, STEPS),
        "method.name=faulty_supervised",
        "trainer.checkpoint_every=100",
        *overrides,
    )


def adam_steps(checkpoint) -> set[int]:
    """The optimizer steps each parameter has taken (AdamW's per-parameter step count)."""
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    return {int(param["step"]) for param in state.values()}


def test_non_finite_steps_are_skipped_counted_and_the_run_goes_on(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    # without clipping, so the gradient is checked even when nothing clips it
    result = faulty_run(
        synth_shards,
        run_dir,
        "trainer.grad_clip=null",
        "+method.nan_loss_steps=[2]",
        "+method.inf_grad_steps=[4]",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run_dir / "results.json").read_text())["skipped_steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/skipped_steps"] for row in rows if "train/loss" in row] == [0, 0, 1, 1, 2, 2, 2, 2]
    log = (run_dir / "train.log").read_text()
    assert log.count("non-finite loss or gradient, step skipped") == 2
    final = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    assert adam_steps(final) == {STEPS - 2}, "a skipped step moved the optimizer"
    assert all(
        torch.isfinite(tensor).all() for tensor in load_file(str(final / "model.safetensors")).values()
    )


def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_one_error(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = faulty_run(
        synth_shards, run_dir, "trainer.max_nonfinite_steps=2", "+method.nan_loss_steps=[1,2,3,4]"
    )
    assert_one_clear_error(result, "error: the loss or gradient was not finite for 3 steps in a row")
    assert "lower trainer.lr" in result.stderr
    assert not (run_dir / "results.json").exists()


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="fp16 loss scaling is CUDA-only: Accelerate has no CPU GradScaler and trainer.precision=fp16 "
    "is refused on CPU (that refusal is tested in test_config_faults.py)",
)
def test_fp16_overflow_is_handled_by_the_loss_scaler(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = faulty_run(
        synth_shards,
        run_dir,
        "trainer.precision=fp16",
        "+method.inf_grad_steps=[2]",  # an overflow: the scaler skips the step and halves its scale
        "+method.nan_loss_steps=[4]",  # a bad loss: skipped and counted by the trainer, scale kept
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # both skipped steps are counted: the overflow (skipped by the scaler) and the bad loss
    assert json.loads((run_dir / "results.json").read_text())["skipped_steps"] == 2
    final = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    scaler = torch.load(final / "scaler.pt", weights_only=True)
    assert scaler["scale"] == 2.0**16 / 2
    assert adam_steps(final) == {STEPS - 2}
    assert all(
        torch.isfinite(tensor).all() for tensor in load_file(str(final / "model.safetensors")).values()
    )
