"""The sample index: what the pack records of each sample, checked against Python's tarfile, and
the index refused wherever it does not describe the shards the manifest lists."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from memetrain.data.manifest import Manifest, ManifestError
from memetrain.data.sample_index import SampleIndex
from memetrain.data.shard_reader import ShardFormatError
from memetrain.data.stream import split_labels
from tests.helpers import shard_infos

LABELS = ["hateful", "misogynous"]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, labels: dict | bytes | None = None, **members: bytes | None) -> list[tuple[str, bytes]]:
    """A sample's members: a jpg, a txt and a json of ``labels`` unless replaced (None: left out)."""
    payload = labels if isinstance(labels, bytes) else json.dumps({"labels": labels or {}}).encode()
    base = {"jpg": b"\xff\xd8\xff" + key.encode() * 50, "txt": f"text of {key}".encode(), "json": payload}
    return [(f"{key}.{ext}", data) for ext, data in {**base, **members}.items() if data is not None]


def test_rows_hold_the_members_tarfile_reads_and_the_labels(tmp_path):
    first = write_tar(tmp_path / "a.tar", sample("k0", {"hateful": 1}) + sample("k1", {"misogynous": 0}))
    second = write_tar(tmp_path / "b.tar", sample("k2", {"hateful": 0, "misogynous": 1}, png=b"\x89PNG"))
    index = SampleIndex.from_shards(tmp_path, shard_infos(first, second), LABELS)
    assert index.keys.tolist() == ["k0", "k1", "k2"] and index.shard_samples.tolist() == [2, 1]
    assert index.labels.tolist() == [[1, -1], [-1, 0], [0, 1]] and (index.problems == "").all()
    located = [*index.members(first, np.array([0, 1])), *index.members(second, np.array([2]))]
    read = [(row, shard.read(image), shard.read(text)) for row, shard, image, text in located]
    with tarfile.open(first) as a, tarfile.open(second) as b:
        members = {i.name: tar.extractfile(i).read() for tar in (a, b) for i in tar.getmembers()}
    for (_, image, text), key in zip(read, ["k0", "k1", "k2"], strict=True):
        assert image == members[f"{key}.jpg"] and text == members[f"{key}.txt"]
    assert [row for row, _, _ in read] == [0, 1, 2]
    assert [row for row, *_ in index.members(first, np.array([1]))] == [1]  # a subset reads only its rows


def test_samples_that_cannot_be_streamed_are_recorded_with_the_reason(tmp_path, caplog):
    cases = {
        "../../escaped": ("member path is absolute or climbs out", sample("../../escaped")),
        "noimage": ("no image member", sample("noimage", jpg=None)),
        "empty": ("image member is empty", sample("empty", jpg=b"")),
        "notext": ("no txt member", sample("notext", txt=None)),
        "nojson": ("no json member", sample("nojson", json=None)),
        "label2": ("are not all 0 or 1", sample("label2", {"hateful": 2})),
        "labeltrue": ("are not all 0 or 1", sample("labeltrue", {"hateful": True})),
        "badjson": ("json member is not a valid object", sample("badjson", b'{"labels": {"ha')),
    }
    members = sample("good", {"hateful": 1}, pickle=b"cos\nsystem\n", pyd=b"MZ")
    for _, case in cases.values():
        members += case
    with caplog.at_level(logging.WARNING):
        index = SampleIndex.from_shards(tmp_path, shard_infos(write_tar(tmp_path / "s.tar", members)), LABELS)
    problems = dict(zip(index.keys.tolist(), index.problems.tolist(), strict=True))
    assert problems.pop("good") == "" and index.labels[0].tolist() == [1, -1]
    assert set(problems) == set(cases)
    for key, (reason, _) in cases.items():
        assert reason in problems[key], (key, problems[key])
    assert "extension 'pickle' are never read" in caplog.text and "extension 'pyd'" in caplog.text
    assert (index.labels[1:] == -1).all() and (index.image[1:, 1] == 0).all()  # nothing to read


def test_a_corrupt_shard_is_refused_by_name(tmp_path):
    path = write_tar(tmp_path / "s.tar", sample("k0"))
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # inside the first header
    path.write_bytes(bytes(data))
    with pytest.raises(
        ShardFormatError, match=f"shard {path} is corrupt or truncated near sample 0 .*bad checksum"
    ):
        SampleIndex.from_shards(tmp_path, shard_infos(path), LABELS)


def test_the_pack_indexes_every_split_and_labels_come_from_it(synth_shards):
    manifest = Manifest.load(synth_shards)
    for name, split in manifest.splits.items():
        index = SampleIndex.of_split(manifest, name)
        assert split.index.name == f"{name}.index.npz" and len(index) == split.index.samples == split.samples
        rows, start = [], 0
        for shard in split.shards:
            path = manifest.shard_path(shard)
            with tarfile.open(path) as tar:
                members = {i.name: tar.extractfile(i).read() for i in tar.getmembers()}
            for row, file, image, text in index.members(path, np.arange(start, start + shard.samples)):
                key = index.keys[row]
                assert file.read(image) == members[f"{key}.jpg"] and file.read(text) == members[f"{key}.txt"]
                labels = json.loads(members[f"{key}.json"])["labels"]
                assert index.labels[row].tolist() == [labels.get(n, -1) for n in manifest.label_names]
                rows.append(row)
            start += shard.samples
        assert rows == list(range(split.samples))
        assert split_labels(synth_shards, name).tolist() == index.labels.tolist()


def edited_index(root: Path, **arrays: np.ndarray) -> Path:
    index = SampleIndex.of_split(Manifest.load(root), "dev")
    path = root / "dev.index.npz"
    SampleIndex(**{**vars(index), **arrays}).save(path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda i: {"label_names": np.asarray(["other"])}, r"has labels \['other'\], the manifest \['hateful'\]"),
        (lambda i: {"shard_sha256": np.asarray(["0" * 64] * len(i.shard_sha256))}, "was made from another dev-000000.tar"),
        (lambda i: {"shard_samples": i.shard_samples + 1}, r"indexes (\d+) samples of dev-000000.tar, the manifest lists (?!\1)\d+"),
        (lambda i: {"labels": np.where(i.labels == 1, 2, i.labels).astype(np.int8)}, r"holds labels outside their columns' values \(-1, 0 and 1"),
        (lambda i: {"image": i.image + [[0, 10**9]]}, "points outside its shards"),
        (lambda i: {"keys": i.keys[:-1]}, "is malformed"),
    ],
    ids=["labels", "shard sha256", "sample count", "label values", "offsets", "rows"],
)  # fmt: skip
def test_an_index_that_does_not_describe_the_manifests_shards_is_refused(
    synth_shards, tmp_path, edit, message
):
    import shutil

    root = Path(shutil.copytree(synth_shards, tmp_path / "copy"))
    index = SampleIndex.of_split(Manifest.load(root), "dev")
    path = edited_index(root, **edit(index))
    manifest = Manifest.load(root)
    with pytest.raises(ManifestError, match=f"sample index {path} {message}"):
        SampleIndex.load(path, manifest.split("dev").shards, manifest.label_names)


def test_an_index_file_that_is_not_one_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "dev.index.npz"
    np.savez(path, keys=np.asarray([{"a": 1}], dtype=object))
    with pytest.raises(ManifestError, match="cannot be read .*re-pack"):
        SampleIndex.load(path, [], LABELS)


def test_a_shard_shorter_than_its_members_is_refused_when_read(tmp_path):
    path = write_tar(tmp_path / "s.tar", sample("k0"))
    index = SampleIndex.from_shards(tmp_path, shard_infos(path), LABELS)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ShardFormatError, match="ends inside a member"):
        list(index.members(path, np.array([0])))
