"""data.label_fraction end to end: a supervised run through the command line trains on exactly the
memes the fraction chooses (every id its batches carried, against label_fraction_indices over the
split's sample index) and records the fraction and how many memes it chose in results.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memetrain.data.manifest import Manifest
from memetrain.data.sample_index import SampleIndex
from memetrain.eval import label_fraction_indices
from tests.faults.conftest import run_faulty
from tests.helpers import tiny_run_overrides

pytestmark = pytest.mark.slow


def test_a_supervised_run_trains_on_exactly_the_chosen_fraction(synth_shards, tmp_path):
    ids_file = tmp_path / "trained_ids.txt"
    run_dir = tmp_path / "run"
    result = run_faulty(
        *tiny_run_overrides(synth_shards, run_dir, steps=12), "data.label_fraction=0.1", "seed=3",
        "method.name=id_recording_supervised", f"+method.ids_file={ids_file}", "data.num_workers=0",
        "eval.protocols=[classifier]", "eval.tsne=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = Manifest.load(synth_shards)
    index = SampleIndex.of_split(manifest, "train")
    labels = index.labels.astype(np.int64)[:, manifest.label_names.index(manifest.main_label)]
    chosen = {str(key) for key in index.keys[label_fraction_indices(labels, 0.1, seed=3)]}
    trained = ids_file.read_text().split()
    assert 10 <= len(chosen) < 0.15 * (labels >= 0).sum()
    assert len(trained) == 12 * 16, "12 steps of 16 memes, each recorded"
    assert set(trained) == chosen, "every meme trained on is one the fraction chose, and each was"

    data = json.loads((run_dir / "results.json").read_text())["data"]
    assert data["label_fraction"] == 0.1 and data["labeled_memes"] == len(chosen)
