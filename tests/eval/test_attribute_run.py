"""End to end through launcher/train.py: a CLIP at random initialisation (trainer.max_steps=0, the
baseline of the attribute-probe margins) evaluated by probe, kNN and zero-shot on the hateful label
and on SynthMemes' attribute columns (eval.targets)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow


def test_a_random_init_clip_is_scored_on_every_attribute_by_every_protocol(synth_hard_shards, tmp_path):
    run_dir = tmp_path / "init"
    result = run_launcher(
        "train.py", "method=clip", "model=clip_small", "data=synth_hard", "eval=probe_synth_hard",
        *tiny_run_overrides(synth_hard_shards, run_dir, steps=0), "eval.tsne=false", "eval.online=[]",
        "eval.protocols=[linear_probe,knn,zero_shot]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 0 and results["checkpoint"]["path"] is None
    for protocol in ("linear_probe", "knn", "zero_shot"):
        scored = results["protocols"][protocol]
        assert scored["targets"] == ["hateful"] and "auroc" in scored["splits"]["test"]
        attributes = scored["attributes"]
        assert list(attributes) == ["image_class", "target_class", "hateful_clean", "confounder"]
        if protocol == "zero_shot":  # prompts only for image_class in eval=probe_synth_hard
            assert "note" in attributes["target_class"] and "note" in attributes["confounder"]
        else:
            assert attributes["hateful_clean"]["kind"] == "binary"
            assert 0 <= attributes["confounder"]["splits"]["test"]["auroc"] <= 1
            assert attributes["target_class"]["kind"] == "classes"
        image_class = attributes["image_class"]
        assert image_class["kind"] == "classes" and len(image_class["classes"]) == 8
        test = image_class["splits"]["test"]
        assert {"accuracy", "f1_macro", "auroc_ovr", "chance", "confusion_matrix"} <= set(test)
        assert len(test["confusion_matrix"]) == 8
        assert (run_dir / "predictions" / f"{protocol}_image_class_test.csv").is_file()


def test_a_class_id_column_cannot_be_a_classifier_target(synth_hard_shards, tmp_path):
    result = run_launcher(
        "train.py", "data=synth_hard", *tiny_run_overrides(synth_hard_shards, tmp_path / "run", steps=1),
        "data.targets=[image_class]",
    )  # fmt: skip
    assert result.returncode != 0
    assert "data.targets=['image_class']: ['image_class'] hold class ids" in result.stderr
    assert "eval.targets=['image_class']" in result.stderr
