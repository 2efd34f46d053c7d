"""What a run reads (memetrain/run_data.py): a dev split carved from train is never trained on, with
labels or without, and streams as its own split; the label fraction comes from the rest."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from memetrain.data.stream import split_labels
from memetrain.data.transforms import Resize
from memetrain.errors import ConfigError
from memetrain.methods import Stage
from memetrain.run_data import CARVED_DEV, RunData
from tests.helpers import REPO


def data_config(shards, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", [f"data.shards={shards}", "data.num_workers=0", *overrides]).data


def test_a_carved_dev_split_is_held_out_of_every_training_stream(synth_shards):
    data = data_config(
        synth_shards, "data.dev_from_train=0.2", f"data.dev_split={CARVED_DEV}", "data.label_fraction=0.5"
    )
    run_data = RunData(data, seed=3)
    dev, train = run_data.carve.dev, run_data.carve.train
    labels = split_labels(synth_shards, "train")[:, 0]
    assert len(dev) == pytest.approx(0.2 * len(labels), abs=2) and not np.intersect1d(dev, train).size
    assert np.mean(labels[dev]) == pytest.approx(np.mean(labels), abs=0.05), "stratified"
    labeled = run_data.labeled_subset()
    assert not np.intersect1d(labeled, dev).size and len(labeled) == pytest.approx(0.5 * len(train), abs=2)

    view = Resize(16)
    dev_ids = {
        key
        for batch in run_data.stream(CARVED_DEV, view)
        for key, ok in zip(batch["id"], batch["valid"])
        if ok
    }
    assert len(dev_ids) == len(dev)
    label_free = run_data.train_stream(Stage("pretrain", 1, needs_labels=False), view)
    unlabeled = run_data.manifest.split("unlabeled").samples
    assert label_free.num_samples == len(train) + unlabeled
    seen = {key for batch in label_free for key in batch["id"]}
    assert not seen & dev_ids, "a held-out meme was trained on"
    supervised = run_data.train_stream(Stage("train", 1, needs_labels=True), view)
    assert supervised.num_samples == len(labeled)


def test_the_carve_is_the_same_for_every_run_seed(synth_shards):
    data = data_config(synth_shards, "data.dev_from_train=0.2", f"data.dev_split={CARVED_DEV}")
    np.testing.assert_array_equal(RunData(data, seed=0).carve.dev, RunData(data, seed=1).carve.dev)


def test_the_carved_split_needs_dev_from_train(synth_shards):
    data = data_config(synth_shards, f"data.dev_split={CARVED_DEV}")
    with pytest.raises(
        ConfigError, match="data.dev_split names \\['train_dev'\\].*set data.dev_from_train=0.1"
    ):
        RunData(data, seed=0).check_splits([Stage("train", 1, needs_labels=True)])
