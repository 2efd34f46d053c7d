"""Online monitors while pretraining: the kNN (and linear probe) of the dev split's frozen features
every validation, in TensorBoard; the best checkpoint they pick is the one evaluated."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow


def test_a_dino_pretraining_shows_its_online_knn_and_keeps_its_best(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path, steps=6), "method=dino", "model=backbone_resnet18",
        "eval=probe", "eval.online=[knn,linear_probe]", "trainer.val_every=2", "trainer.keep_best=knn_auroc",
        "eval.checkpoint=best", "eval.tsne=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    monitored = [row for row in rows if "val/knn_auroc" in row]
    assert [row["step"] for row in monitored] == [2, 4, 6]
    assert all("val/linear_probe_auroc" in row and 0 <= row["val/knn_auroc"] <= 1 for row in monitored)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/knn_auroc")] == [2, 4, 6]

    results = json.loads((tmp_path / "results.json").read_text())
    best = max(monitored, key=lambda row: row["val/knn_auroc"])  # the first of equals, as the trainer keeps
    assert results["checkpoint"]["best"] == {
        "metric": "knn_auroc",
        "value": best["val/knn_auroc"],
        "step": best["step"],
    }
    # the evaluation's kNN of the dev split (the whole labeled fraction as its bank, here under the
    # monitor's 2000) scores the best checkpoint exactly as the monitor did
    assert results["protocols"]["knn"]["splits"]["dev"]["auroc"] == pytest.approx(
        best["val/knn_auroc"], abs=1e-12
    )


def test_monitors_need_a_dev_split(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path, steps=2), "method=dino", "model=backbone_resnet18",
        "eval=probe", "data.dev_split=null",
    )  # fmt: skip
    assert (
        result.returncode == 2
        and "error: eval.online=['knn'] monitors on the dev split: set data.dev_split" in result.stderr
    )
