"""Label columns of class ids (manifest schema 3): packed, indexed, checked and streamed; schema-2
packs still read (every column 0/1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from memetrain.data.manifest import Manifest, ManifestError
from memetrain.data.pack import PackOptions, pack
from memetrain.data.records import Entry
from memetrain.data.sample_index import SampleIndex
from memetrain.data.sources.synth import SynthMemes, attribute_classes
from memetrain.data.stream import split_labels
from tests.data.test_pack import shard_samples
from tests.helpers import pack_synth, train_stream


@pytest.fixture(scope="module")
def hard_pack(tmp_path_factory) -> Path:
    """60 hard memes at 48 px with their attribute columns, 20 per shard, plus 8 unlabeled."""
    return pack_synth(
        tmp_path_factory.mktemp("hard"), count=60, image_size=48, per_shard=20, difficulty="hard",
        attributes=True, unlabeled=8,
    )  # fmt: skip


def test_the_manifest_names_each_class_id_columns_classes_and_the_index_holds_the_json_labels(hard_pack):
    manifest = Manifest.load(hard_pack)
    assert manifest.schema_version == 3
    assert manifest.label_classes == {k: list(v) for k, v in attribute_classes("hard").items()}
    assert manifest.binary_labels() == ["hateful", "hateful_clean", "confounder"]
    assert manifest.label_sizes() == [2, 8, 8, 8, 6, 4, 2, 2]
    for split in ("train", "dev", "test"):
        labels = split_labels(hard_pack, split)
        samples = shard_samples(hard_pack, split)
        expected = [
            [json.loads(s["json"])["labels"][n] for n in manifest.label_names] for s in samples.values()
        ]
        assert labels.tolist() == expected
    assert (split_labels(hard_pack, "unlabeled") == -1).all()
    assert manifest.splits["train"].label_histogram["image_class"].keys() <= {str(i) for i in range(8)}


def test_a_stream_carries_every_column_and_the_main_label_apart(hard_pack):
    batch = next(iter(train_stream(hard_pack, "train", batch_size=8)))
    assert batch["labels"].shape == (8, 8)
    assert batch["label"].tolist() == batch["labels"][:, 0].tolist()
    assert batch["labels"][:, 1].max() <= 7 and batch["labels"][:, 1].min() >= 0


def test_an_index_with_a_class_id_past_its_columns_classes_is_refused(hard_pack, tmp_path):
    root = Path(shutil.copytree(hard_pack, tmp_path / "copy"))
    manifest = Manifest.load(root)
    index = SampleIndex.of_split(manifest, "dev")
    labels = index.labels.copy()
    labels[0, manifest.label_names.index("count")] = 4  # count has 4 classes: ids 0..3
    path = root / "dev.index.npz"
    SampleIndex(**{**vars(index), "labels": labels}).save(path)
    with pytest.raises(ManifestError, match="holds labels outside their columns' values.*re-pack"):
        SampleIndex.load(path, manifest.split("dev").shards, manifest.label_names, manifest.label_sizes())
    labels[0, manifest.label_names.index("count")] = 3
    SampleIndex(**{**vars(index), "labels": labels}).save(path)  # in range: read
    SampleIndex.load(path, manifest.split("dev").shards, manifest.label_names, manifest.label_sizes())


class BadClassSource(SynthMemes):
    """Hard SynthMemes whose meme 3 has an image class past the 8 there are."""

    def load(self, entry: Entry):
        record = super().load(entry)
        if entry.ref == 3:
            object.__setattr__(record, "labels", {**record.labels, "image_class": 8})
        return record


def test_a_record_with_a_label_outside_its_column_is_rejected_by_name(tmp_path):
    options = dict(count=12, image_size=40, seed=0, difficulty="hard")
    summary = pack(BadClassSource(**options), tmp_path, PackOptions(workers=1), options)
    assert [r["id"] for r in summary.rejected] == ["synth0000003"]
    assert "label 'image_class' is 8; expected a class id 0..7" in summary.rejected[0]["reason"]
    assert sum(summary.written.values()) == 11


def test_a_schema_2_pack_reads_as_all_binary_and_bad_label_classes_are_refused(synth_shards, tmp_path):
    root = Path(shutil.copytree(synth_shards, tmp_path / "old"))
    raw = json.loads((root / "manifest.json").read_text())
    del raw["label_classes"]
    raw["schema_version"] = 2  # as memetrain wrote packs before class-id columns
    (root / "manifest.json").write_text(json.dumps(raw))
    manifest = Manifest.load(root)
    assert manifest.label_classes == {} and manifest.label_sizes() == [2]
    assert split_labels(root, "dev").tolist() == split_labels(synth_shards, "dev").tolist()
    raw.update(schema_version=3, label_classes={"hateful": ["only"]})
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"label_classes\['hateful'\] must be .*re-pack"):
        Manifest.load(root)
    raw["label_classes"] = {"missing": ["a", "b"]}
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"label_classes\['missing'\]"):
        Manifest.load(root)


def test_every_attribute_column_of_an_easy_pack_is_a_class_id_column(tmp_path):
    root = pack_synth(tmp_path, count=24, image_size=40, per_shard=24, attributes=True)
    manifest = Manifest.load(root)
    assert manifest.label_names == ["hateful", "image_class", "target_class", "template", "colour", "count"]
    labels = np.concatenate([split_labels(root, s) for s in manifest.splits])
    assert ((labels[:, 1:] >= 0) & (labels[:, 1:] < np.array([4, 4, 4, 6, 4]))).all()
