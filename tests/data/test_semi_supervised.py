"""Labeled + unlabeled batches: the parts, hidden labels, independent epochs, and an exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from memetrain.data.semi_supervised import SemiSupervisedStream, concatenate
from memetrain.data.stream import StreamError
from tests.helpers import train_stream

LABELED = np.arange(0, 40, 2)  # 20 training memes: 2 batches of 8 per epoch (drop_last)


def stream(shards) -> SemiSupervisedStream:
    return SemiSupervisedStream(
        train_stream(shards, "train", batch_size=8, subset=LABELED),
        train_stream(shards, ["train", "unlabeled"], batch_size=4),
    )


def ids(batches) -> list[list[str]]:
    return [batch["id"] for batch in batches]


def test_each_batch_is_labeled_rows_then_unlabeled_rows_with_hidden_labels(synth_shards):
    batches = list(itertools.islice(iter(stream(synth_shards)), 6))
    labeled_ids = set()
    for batch in batches:
        assert len(batch["id"]) == 12 and batch["image"].shape[0] == 12 and batch["valid"].all()
        assert (batch["labels"][:8] >= 0).all() and (batch["labels"][8:] == -1).all()
        assert (batch["label"][8:] == -1).all()
        labeled_ids.update(batch["id"][:8])
    # six batches from a part of two per epoch: it went through three epochs, of the same 16 memes
    assert len(labeled_ids) == 16 and all(key.startswith("synth0") for key in labeled_ids)
    unlabeled_ids = [key for batch in batches for key in batch["id"][8:]]
    assert len(set(unlabeled_ids)) == len(unlabeled_ids) == 24  # the large part is still in its first epoch


def test_resume_continues_with_the_same_batches(synth_shards):
    uninterrupted = ids(itertools.islice(iter(stream(synth_shards)), 9))
    first = stream(synth_shards)
    head = ids(itertools.islice(iter(first), 5))
    resumed = stream(synth_shards)
    resumed.load_state_dict(first.state_dict())
    assert head + ids(itertools.islice(iter(resumed), 4)) == uninterrupted


def test_a_plain_stream_state_is_refused(synth_shards):
    plain = train_stream(synth_shards, "train", batch_size=8)
    with pytest.raises(StreamError, match="labeled \\+ unlabeled"):
        stream(synth_shards).load_state_dict(plain.state_dict())


def test_concatenate_joins_tensors_views_and_lists():
    a = {"id": ["a"], "label": torch.tensor([1]), "views": [torch.zeros(1, 2), torch.ones(1, 3)]}
    b = {"id": ["b", "c"], "label": torch.tensor([0, -1]), "views": [torch.ones(2, 2), torch.zeros(2, 3)]}
    joined = concatenate(a, b)
    assert joined["id"] == ["a", "b", "c"] and joined["label"].tolist() == [1, 0, -1]
    assert [v.shape for v in joined["views"]] == [(3, 2), (3, 3)]
    with pytest.raises(StreamError, match="different fields"):
        concatenate(a, {"id": ["b"]})
