"""data.mix: several packs in one label-free stream, each its weighted share of every batch, resumable
exactly, with the per-pack counts; a carved dev split stays out of it."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from memetrain.data.mix import MixedStream, batch_quotas, parse_mix
from memetrain.data.stream import MemeStream, StreamError, StreamSettings
from memetrain.data.transforms import Resize
from memetrain.errors import ConfigError
from memetrain.methods import Stage
from memetrain.run_data import RunData
from tests.helpers import REPO, pack_synth


@pytest.fixture(scope="module")
def hard_pack(tmp_path_factory) -> Path:
    """60 hard memes with attribute columns (a pack with other label columns than synth_shards)."""
    return pack_synth(
        tmp_path_factory.mktemp("mixhard"), count=60, image_size=48, per_shard=20, difficulty="hard",
        attributes=True,
    )  # fmt: skip


def test_quotas_split_the_batch_by_weight_times_size_largest_remainder_first():
    assert batch_quotas([1, 1], [300, 100], 32) == [24, 8]  # natural shares, as one corpus
    assert batch_quotas([1, 3], [300, 100], 32) == [16, 16]  # the small pack upsampled 3x
    assert batch_quotas([1, 1, 1], [1, 1, 1], 32) == [11, 11, 10]  # remainders: ties to the earlier pack
    assert batch_quotas([1, 1], [1000, 33], 16) == [15, 1]
    with pytest.raises(ConfigError, match=r"packs \[1\] get no meme of a batch of 16 .*raise their weights"):
        batch_quotas([1, 1], [1000, 1], 16)  # a pack is never silently given more than its share


def test_bad_mix_entries_are_refused_with_the_fix(synth_shards, hard_pack):
    splits = ["train", "unlabeled"]
    sources = parse_mix(
        [{"shards": str(synth_shards), "weight": 1}, {"shards": str(hard_pack), "weight": 2}], splits
    )
    assert [s.splits for s in sources] == [("train", "unlabeled"), ("train",)]  # hard_pack has no unlabeled
    cases = [
        ([{"shards": str(synth_shards)}], r"data.mix\[0\]=.*give \{shards: <pack directory>, weight"),
        ([{"shards": str(synth_shards), "weight": 0}], r"data.mix\[0\].weight=0: give a positive number"),
        ([{"shards": str(synth_shards), "weight": 1, "splits": ["nope"]}], r"splits names \['nope'\]"),
        ([{"shards": str(synth_shards), "weight": 1}] * 2, "lists a pack twice"),
        ([], "data.mix is empty"),
    ]
    for entries, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_mix(entries, splits)


def _stream(shards, splits, batch_size) -> MemeStream:
    settings = StreamSettings(batch_size=batch_size, seed=0, drop_last=True, num_workers=0)
    return MemeStream(shards, splits, settings, Resize(24))


def _epochs(stream: MemeStream):
    """A stream's batches, epoch after epoch."""
    while True:
        yield from stream


def _mixed(synth_shards, hard_pack) -> MixedStream:
    streams = [_stream(synth_shards, ["train", "unlabeled"], 6), _stream(hard_pack, ["train"], 2)]
    return MixedStream(streams, ["easy", "hard"], label_columns=1)


def test_every_batch_is_each_packs_own_stream_in_order_labels_hidden(synth_shards, hard_pack):
    mixed = _mixed(synth_shards, hard_pack)
    alone = [_stream(synth_shards, ["train", "unlabeled"], 6), _stream(hard_pack, ["train"], 2)]
    easy, hard_batches = (_epochs(stream) for stream in alone)
    batches = list(itertools.islice(iter(mixed), 30))  # the hard pack (~48 train memes) wraps its epoch
    for batch in batches:
        first, second = next(easy), next(hard_batches)
        assert batch["id"] == first["id"] + second["id"] and batch["text"] == first["text"] + second["text"]
        assert batch["image"].shape == (8, 3, 24, 24)
        assert (batch["image"][:6] == first["image"]).all() and (batch["image"][6:] == second["image"]).all()
        assert (
            batch["labels"].shape == (8, 1) and (batch["labels"] == -1).all() and (batch["label"] == -1).all()
        )
    assert mixed.counts == [6 * 30, 2 * 30]
    assert "easy: 180 memes" in mixed.report() and mixed.quotas == [6, 2]


def test_a_mixed_stream_resumes_exactly(synth_shards, hard_pack):
    straight = list(itertools.islice(iter(_mixed(synth_shards, hard_pack)), 34))
    first = _mixed(synth_shards, hard_pack)
    list(itertools.islice(iter(first), 27))
    state = first.state_dict()
    resumed = _mixed(synth_shards, hard_pack)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(iter(resumed), 7))
    for a, b in zip(straight[27:], rest, strict=True):
        assert a["id"] == b["id"] and (a["image"] == b["image"]).all()
    assert resumed.counts == [6 * 34, 2 * 34]
    other = MixedStream([_stream(synth_shards, ["train"], 6)], ["easy"], 1)
    with pytest.raises(StreamError, match="it mixed \\['easy', 'hard'\\]"):
        other.load_state_dict(state)


def test_a_run_with_data_mix_pretrains_on_every_pack_but_the_carved_dev(synth_shards, hard_pack):
    mix = f"data.mix=[{{shards: {synth_shards}, weight: 1}},{{shards: {hard_pack}, weight: 4}}]"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        data = compose(
            "train",
            [f"data.shards={synth_shards}", "data.num_workers=0", "data.batch_size=16", mix,
             "data.dev_from_train=0.2", "data.dev_split=train_dev"],
        ).data  # fmt: skip
    run_data = RunData(data, seed=0)
    run_data.check_splits([Stage("pretrain", 1, needs_labels=False)])
    stream = run_data.train_stream(Stage("pretrain", 1, needs_labels=False), Resize(16))
    assert isinstance(stream, MixedStream)
    own = len(run_data.carve.train) + run_data.manifest.split("unlabeled").samples
    hard = next(s for s in stream.streams if Path(s.manifest.root) == hard_pack).num_samples
    assert stream.quotas == batch_quotas([1, 4], [own, hard], 16)
    dev_ids = {key for batch in run_data.stream("train_dev", Resize(16)) for key in batch["id"]}
    easy_ids = set()
    for batch in itertools.islice(iter(stream), 12):
        easy_ids.update(batch["id"][: stream.quotas[0]])
    assert not easy_ids & dev_ids, "a held-out meme was trained on"
    supervised = run_data.train_stream(Stage("train", 1, needs_labels=True), Resize(16))
    assert isinstance(supervised, MemeStream), "labeled stages keep data.shards alone"
    assert np.all(np.asarray(stream.quotas) >= 1)
