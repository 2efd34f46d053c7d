"""Packing: shards and manifest in the real formats, round trip, rejections, atomicity."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer

from memetrain.data.manifest import Manifest, ManifestError, file_sha256
from memetrain.data.pack import PackError, PackOptions, pack
from memetrain.data.records import Entry, Rejected
from memetrain.data.sources.hateful_memes import HatefulMemes
from memetrain.data.sources.synth import SynthMemes, write_hateful_memes_layout
from memetrain.data.tokenizer import TokenTable
from tests.helpers import REPO, pack_synth


def shard_samples(root: Path, split: str) -> dict[str, dict]:
    manifest = Manifest.load(root)
    samples = {}
    for shard in manifest.split(split).shards:
        for sample in wds.WebDataset(str(root / shard.name), shardshuffle=False):
            samples[sample["__key__"]] = sample
    return samples


def test_manifest_matches_the_shards_on_disk(synth_shards):
    manifest = Manifest.load(synth_shards)
    assert set(manifest.splits) == {"train", "dev", "test", "unlabeled"}
    assert sum(split.samples for split in manifest.splits.values()) == 280
    for split in manifest.splits.values():
        assert len(split.shards) >= 1
        for shard in split.shards:
            path = synth_shards / shard.name
            assert path.stat().st_size == shard.bytes
            assert file_sha256(path) == shard.sha256
            assert shard.samples <= 40
    assert manifest.splits["unlabeled"].unlabeled == 40
    histogram = manifest.splits["train"].label_histogram["hateful"]
    assert histogram["0"] + histogram["1"] == manifest.splits["train"].samples
    assert manifest.tokenizer == "tokenizer.json" and (synth_shards / "tokenizer.json").is_file()
    assert manifest.tokenizer_sha256 == file_sha256(synth_shards / "tokenizer.json")
    assert not list(synth_shards.glob(".*tmp"))


def test_token_tables_hold_every_splits_texts_as_the_packed_tokenizer_encodes_them(synth_shards):
    manifest = Manifest.load(synth_shards)
    tokenizer = Tokenizer.from_file(str(synth_shards / "tokenizer.json"))
    for name, split in manifest.splits.items():
        table = TokenTable.load(manifest.tokens_path(name))
        assert (
            split.tokens.name == f"{name}.tokens.npz" and len(table) == split.tokens.samples == split.samples
        )
        texts = [sample["txt"].decode() for sample in shard_samples(synth_shards, name).values()]  # in order
        assert [table[i].tolist() for i in range(len(table))] == [tokenizer.encode(t).ids for t in texts]


def test_a_token_table_that_does_not_match_the_manifest_is_refused(synth_shards, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    for path in synth_shards.iterdir():
        (root / path.name).write_bytes(path.read_bytes())
    table = TokenTable.load(root / "dev.tokens.npz")
    TokenTable(table.ids[::-1].copy(), table.offsets).save(root / "dev.tokens.npz")  # same size, other ids
    with pytest.raises(ManifestError, match="dev.tokens.npz does not match its sha256"):
        Manifest.load(root).tokens_path("dev")
    (root / "dev.tokens.npz").unlink()
    with pytest.raises(ManifestError, match="dev.tokens.npz is missing"):
        Manifest.load(root).tokens_path("dev")


def test_every_record_round_trips_exactly_once_with_identical_bytes(synth_shards):
    source = SynthMemes(count=240, image_size=64, seed=0, unlabeled=40, attributes=False)  # as synth_shards
    expected = {entry.id: entry for entry in source.entries()}
    packed = {}
    for split in ("train", "dev", "test", "unlabeled"):
        for key, sample in shard_samples(synth_shards, split).items():
            assert key not in packed
            packed[key] = (split, sample)
    assert packed.keys() == expected.keys()
    for key in ("synth0000000", "synth0000017", "synthu0000003"):
        entry, (split, sample) = expected[key], packed[key]
        record = source.load(entry)
        assert split == entry.split
        assert sample["jpg"] == record.image
        assert sample["txt"].decode() == record.text
        meta = json.loads(sample["json"])
        assert meta["labels"] == dict(record.labels) and meta["source"] == "synth"
        if record.labels:
            assert int(sample["cls"]) == record.labels["hateful"]
        else:
            assert "cls" not in sample


def test_tars_are_plain_tar_files(synth_shards):
    shard = Manifest.load(synth_shards).split("train").shards[0]
    listing = subprocess.run(
        ["tar", "tf", str(synth_shards / shard.name)], capture_output=True, text=True, check=True
    )
    names = listing.stdout.split()
    assert len(names) == 4 * shard.samples
    assert {Path(name).suffix for name in names} == {".cls", ".jpg", ".json", ".txt"}


def hateful_memes_with_bad_records(root: Path) -> Path:
    """A real-format Hateful Memes directory (from SynthMemes) plus one bad line of each kind."""
    write_hateful_memes_layout(root, count=30, image_size=48, seed=1)
    (root / "img" / "90001.png").write_bytes(b"")
    (root / "img" / "90002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    good_png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(good_png, format="PNG")
    (root / "img" / "90003.png").write_bytes(good_png.getvalue()[: len(good_png.getvalue()) // 2])
    (root / "img" / "90005.png").write_bytes(good_png.getvalue())
    (root / "img" / "90006.png").write_bytes(good_png.getvalue())
    first = json.loads((root / "train.jsonl").read_text().splitlines()[0].replace("\\/", "/"))
    lines = [
        '{"id":90001,"img":"img\\/90001.png","label":0,"text":"zero byte image"}',
        '{"id":90002,"img":"img\\/90002.png","label":1,"text":"corrupt png"}',
        '{"id":90003,"img":"img\\/90003.png","label":0,"text":"truncated png"}',
        '{"id":90004,"img":"img\\/90004.png","label":0,"text":"missing image"}',
        '{"id":90005,"img":"img\\/90005.png","label":2,"text":"label out of range"}',
        '{"id":90006,"img":"img\\/90006.png","label":0,"text":"   "}',
        json.dumps(first).replace("/", "\\/"),
        '{"id":90007,"img":"img\\/90007.png", "label":',
    ]
    with open(root / "train.jsonl", "ab") as handle:
        handle.write(("\n".join(lines) + "\n").encode())
        handle.write(b'{"id":90008,"img":"img\\/90008.png","label":0,"text":"caf\xe9"}\n')
    return root


def test_bad_records_are_rejected_with_id_and_reason_and_the_rest_is_packed(tmp_path):
    data = hateful_memes_with_bad_records(tmp_path / "hm")
    summary = pack(HatefulMemes(str(data)), tmp_path / "out", PackOptions(workers=1), {"input": str(data)})
    manifest = Manifest.load(tmp_path / "out")
    reasons = {item["id"]: item["reason"] for item in manifest.rejected}
    assert "empty" in reasons["90001"]
    assert "cannot be decoded" in reasons["90002"]
    assert "cannot be decoded" in reasons["90003"]
    assert "img/90004.png not found" in reasons["90004"]
    assert "label 'hateful' is 2" in reasons["90005"]
    assert "text is empty" in reasons["90006"]
    assert any("duplicate id" in reason for reason in reasons.values())
    assert any("line" in key or "line" in reason for key, reason in reasons.items() if "9000" not in key)
    assert len(manifest.rejected) == 9
    assert manifest.rejected == summary.rejected
    packed = sum(split.samples for split in manifest.splits.values())
    assert packed == 30
    test_split = manifest.split("test_unseen")
    assert test_split.unlabeled == test_split.samples > 0
    assert all(item["split"] for item in manifest.rejected)


def test_strict_pack_fails_and_keeps_nothing(tmp_path):
    data = hateful_memes_with_bad_records(tmp_path / "hm")
    with pytest.raises(PackError, match="strict=true and 9 record"):
        pack(HatefulMemes(str(data)), tmp_path / "out", PackOptions(workers=1, strict=True), {})
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix in (".tar", ".json", ".tmp")]


class ExplodingSource(SynthMemes):
    """SynthMemes whose 50th image load crashes, like a pack killed half-way."""

    def load(self, entry: Entry):
        if entry.ref == 50:
            raise RuntimeError("simulated crash")
        return super().load(entry)


def test_interrupted_pack_leaves_no_dataset_and_a_rerun_rewrites_cleanly(tmp_path):
    options = dict(count=120, image_size=48, seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pack(ExplodingSource(**options), tmp_path, PackOptions(max_samples_per_shard=20, workers=1), options)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert not list(tmp_path.glob("*.tar")), "a failed pack keeps none of its shards"
    pack_synth(tmp_path, count=120, image_size=48, per_shard=20)
    manifest = Manifest.load(tmp_path)
    assert sum(split.samples for split in manifest.splits.values()) == 120
    listed = {shard.name for split in manifest.splits.values() for shard in split.shards}
    assert {path.name for path in tmp_path.glob("*.tar")} == listed


def test_repacking_with_the_same_options_is_skipped_and_overwrite_redoes_it(tmp_path):
    options = dict(count=40, image_size=48, seed=0)
    first = pack(SynthMemes(**options), tmp_path, PackOptions(workers=1), options)
    assert not first.skipped
    assert pack(SynthMemes(**options), tmp_path, PackOptions(workers=1), options).skipped
    assert not pack(SynthMemes(**options), tmp_path, PackOptions(workers=1, overwrite=True), options).skipped
    options["seed"] = 1
    assert not pack(SynthMemes(**options), tmp_path, PackOptions(workers=1), options).skipped


def test_a_pack_from_an_older_schema_is_refused_and_packing_again_replaces_it(tmp_path):
    options = dict(count=40, image_size=48, seed=0)
    pack(SynthMemes(**options), tmp_path, PackOptions(workers=1), options)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["schema_version"] = 1
    for split in raw["splits"].values():
        del split["index"]  # as memetrain wrote them before sample indexes
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="schema version 1, this memetrain reads 2, 3; re-pack"):
        Manifest.load(tmp_path)
    assert not pack(SynthMemes(**options), tmp_path, PackOptions(workers=1), options).skipped
    manifest = Manifest.load(tmp_path)
    assert all(manifest.index_path(name).is_file() for name in manifest.splits)


def test_resize_at_pack_shrinks_and_reencodes(tmp_path):
    options = dict(count=20, image_size=160, seed=0)
    pack(
        SynthMemes(**options),
        tmp_path,
        PackOptions(workers=1, resize_longest=64, image_format="png"),
        options,
    )
    sample = next(iter(shard_samples(tmp_path, "train").values()))
    assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)


def test_parallel_pack_writes_the_same_shards_as_a_serial_one(tmp_path):
    options = dict(count=60, image_size=48, seed=3)
    pack(SynthMemes(**options), tmp_path / "serial", PackOptions(workers=1), options)
    pack(SynthMemes(**options), tmp_path / "parallel", PackOptions(workers=2), options)
    serial, parallel = Manifest.load(tmp_path / "serial"), Manifest.load(tmp_path / "parallel")
    # the token tables may differ: WordPiece training is not deterministic (tokenizers#1794)
    assert serial.splits.keys() == parallel.splits.keys()
    for name, split in serial.splits.items():
        assert (split.shards, split.label_histogram) == (
            parallel.splits[name].shards,
            parallel.splits[name].label_histogram,
        )


def run_pack_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launcher" / "pack.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_packs_hateful_memes_and_reports_rejections(tmp_path):
    data = hateful_memes_with_bad_records(tmp_path / "hm")
    result = run_pack_cli("source=hateful_memes", f"input={data}", f"output={tmp_path / 'out'}", "workers=2")
    assert result.returncode == 0, result.stderr
    assert "packed 30 memes" in result.stdout and "rejected 9" in result.stdout
    assert "90004: image file img/90004.png not found" in result.stdout
    strict = run_pack_cli("source=hateful_memes", f"input={data}", f"output={tmp_path / 'o2'}", "strict=true")
    assert strict.returncode == 2 and "\nerror: strict=true" in strict.stderr
    assert "Traceback" not in strict.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["source=hateful_memes", "input=/nonexistent/hm"],
            "error: input=/nonexistent/hm is not a directory",
        ),
        (["source=nope"], "Could not find 'source/nope'"),
        (["source=synth", "count=0"], "error: "),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, overrides, message):
    result = run_pack_cli(*overrides, f"output={tmp_path / 'out'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rejected_is_an_exception_with_a_dict_form():
    err = Rejected("42", "why", split="train")
    assert err.as_dict() == {"id": "42", "split": "train", "reason": "why"}
