"""Attribute-probe margins (memetrain/eval/margins.py): each seed's trained score minus the same
seed's random-init score, mean and std over seeds, from the runs' results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from memetrain.eval.margins import collect_margins, main


def write_run(root: Path, name: str, image_accuracy: float, round_auroc: float) -> None:
    attributes = {
        "image_class": {"kind": "classes", "splits": {"test": {"accuracy": image_accuracy}}},
        "round": {"kind": "binary", "splits": {"test": {"auroc": round_auroc, "accuracy": 0.0}}},
        "colour": {"note": "no eval.zero_shot.prompts.colour: not scored zero-shot"},
    }
    (root / name).mkdir()
    (root / name / "results.json").write_text(json.dumps({"protocols": {"knn": {"attributes": attributes}}}))


def test_margins_pair_each_seed_with_its_own_baseline(tmp_path):
    for seed, (trained, init) in enumerate([(0.9, 0.5), (0.8, 0.6)]):
        write_run(tmp_path, f"clip-seed{seed}", trained, 0.7)
        write_run(tmp_path, f"clip-random_init-seed{seed}", init, 0.6 + seed / 10)
    write_run(tmp_path, "dino-seed0", 0.4, 0.5)  # no baseline: not in the table
    rows = {(r["method"], r["attribute"]): r for r in collect_margins(tmp_path, "test")}
    assert set(rows) == {("clip", "image_class"), ("clip", "round")}
    image = rows[("clip", "image_class")]
    assert image["seeds"] == 2 and image["trained"] == pytest.approx(0.85)
    assert image["margin"] == pytest.approx(0.3) and image["margin_std"] == pytest.approx(
        np.std([0.4, 0.2], ddof=1)
    )
    assert rows[("clip", "round")]["margin"] == pytest.approx(np.mean([0.1, 0.0]))
    assert main([str(tmp_path)]) == 0
    table = (tmp_path / "attribute_margins.md").read_text()
    assert "| clip | knn | image_class | 0.850 ± 0.071 | 0.550 ± 0.071 | +0.300 ± 0.141 | 2 |" in table
    assert (tmp_path / "attribute_margins.csv").read_text().startswith("method,protocol,attribute,seeds")


def test_no_pairs_is_an_error_that_says_how_to_make_them(tmp_path, capsys):
    write_run(tmp_path, "clip-seed0", 0.9, 0.7)
    assert main([str(tmp_path)]) == 1
    assert "X-random_init-seedN" in capsys.readouterr().err
