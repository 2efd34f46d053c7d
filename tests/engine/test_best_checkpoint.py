"""The best checkpoint on dev (trainer.keep_best), early stopping and eval.checkpoint=best, end to
end: which steps are validated, kept and evaluated follows from the logged dev metrics alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memetrain.eval.validation import improves
from tests.faults.conftest import assert_one_clear_error, assert_same_weights, fault_run_overrides
from tests.helpers import run_launcher

pytestmark = pytest.mark.slow

# min_delta 1.0: no AUROC can improve on the first one by more, so the first validation is the best
# and every later one counts towards patience, whatever the training does
NEVER_IMPROVES = [
    "trainer.keep_best=auroc",
    "trainer.early_stopping.patience=2",
    "trainer.early_stopping.min_delta=1.0",
    "trainer.val_every=2",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=3",
]


def dev_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "val/loss" in row]


@pytest.fixture(scope="module")
def stopped_run(synth_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped")
    overrides = fault_run_overrides(synth_shards, run_dir)
    overrides.remove("eval.protocols=[]")
    result = run_launcher("train.py", *overrides, *NEVER_IMPROVES, "eval.checkpoint=best", "eval.tsne=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_early_stopping_keeps_the_best_checkpoint_and_evaluates_it(stopped_run):
    rows = dev_rows(stopped_run)
    assert [row["step"] for row in rows] == [2, 4, 6], "validated every 2 steps until 2 did not improve"
    assert {"val/auroc", "val/f1_weighted", "val/f1_macro", "val/accuracy", "val/loss"} <= rows[0].keys()
    results = json.loads((stopped_run / "results.json").read_text())
    assert results["steps"] == 6
    checkpoint = results["checkpoint"]
    assert (
        checkpoint["selected"] == "best" and checkpoint["stopped_early"] and checkpoint["trained_steps"] == 6
    )
    assert checkpoint["step"] == 2 and checkpoint["path"] == "checkpoints/step_0000002"
    assert checkpoint["best"] == {"metric": "auroc", "value": rows[0]["val/auroc"], "step": 2}
    # kept: the newest three, and the best however old
    assert sorted(p.name for p in (stopped_run / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004", "step_0000005", "step_0000006",
    ]  # fmt: skip
    # the evaluation scored the best weights: the dev AUROC is the one validation measured at step 2
    dev = results["protocols"]["classifier"]["splits"]["dev"]
    assert dev["auroc"] == pytest.approx(rows[0]["val/auroc"], abs=1e-6)


def test_a_requeued_run_keeps_its_early_stopping_count(synth_shards, stopped_run, tmp_path):
    """Resumed at step 4 (one validation without improvement behind it), the run stops at 6 as
    the uninterrupted one did; a count started again would run to 8."""
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "requeued"))
    shutil.rmtree(run_dir / "checkpoints" / "step_0000005")
    shutil.rmtree(run_dir / "checkpoints" / "step_0000006")
    (run_dir / "results.json").unlink()
    overrides = fault_run_overrides(synth_shards, run_dir)
    overrides.remove("eval.protocols=[]")
    result = run_launcher("train.py", *overrides, *NEVER_IMPROVES, "eval.checkpoint=best", "eval.tsne=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_0000004 (step 4)" in result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["checkpoint"]["trained_steps"] == 6 and results["checkpoint"]["stopped_early"]
    assert_same_weights(
        stopped_run / "checkpoints" / "step_0000006", run_dir / "checkpoints" / "step_0000006"
    )


def test_best_needs_keep_best(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, tmp_path / "run"), "eval.checkpoint=best"
    )
    assert_one_clear_error(result, "error: eval.checkpoint=best needs trainer.keep_best=<metric>")
    assert not (tmp_path / "run" / "config.yaml").exists(), "a refused config claimed the run directory"


def test_an_unreported_metric_names_the_ones_there_are(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, tmp_path / "run", steps=6), "trainer.keep_best=aucroc"
    )
    assert_one_clear_error(result, "error: trainer.keep_best=aucroc: validation of supervised reports ")
    assert "auroc, cls_loss, f1_macro, f1_weighted, loss" in result.stderr


@pytest.mark.parametrize(
    ("metric", "value", "best", "delta", "expected"),
    [
        ("auroc", 0.71, None, 0.0, True),  # the first value is the best so far
        ("auroc", 0.71, 0.70, 0.0, True),
        ("auroc", 0.70, 0.70, 0.0, False),  # a tie is no improvement
        ("auroc", 0.705, 0.70, 0.01, False),
        ("loss", 0.5, 0.6, 0.0, True),  # a loss improves downwards
        ("cls_loss", 0.61, 0.6, 0.0, False),
    ],
)
def test_improvement_direction_and_margin(metric, value, best, delta, expected):
    assert improves(metric, value, best, delta) is expected
