"""The stream: plans, rank/worker coverage, determinism, exact resume, bad samples, safety."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from memetrain.data import decode
from memetrain.data import stream as stream_module
from memetrain.data.decode import decode_rgb
from memetrain.data.epoch_plan import epoch_plan
from memetrain.data.manifest import Manifest, ManifestError
from memetrain.data.stream import MemeStream, StreamError, StreamSettings
from memetrain.data.tokenizer import TextEncoder
from memetrain.data.transforms import AssignmentAugment, MultiCrop, Resize
from tests.helpers import agree_manifest, torchrun


def stream(shards: Path, split: str = "train", view=None, **settings) -> MemeStream:
    settings.setdefault("batch_size", 8)
    settings.setdefault("num_workers", 0)
    rank, world_size = settings.pop("rank", 0), settings.pop("world_size", 1)
    subset, text_encoder = settings.pop("subset", None), settings.pop("text_encoder", None)
    return MemeStream(
        shards,
        split,
        StreamSettings(**settings),
        view or Resize(32),
        text_encoder,
        rank=rank,
        world_size=world_size,
        subset=subset,
    )


def ids_of(batches) -> list[str]:
    return [key for batch in batches for key, valid in zip(batch["id"], batch["valid"]) if valid]


# plan -------------------------------------------------------------------------------------------


def expand(plan) -> list[tuple[int, int, bool]]:
    return [(seg.shard, index, seg.pad) for seg in plan for index in range(seg.start, seg.stop)]


@pytest.mark.parametrize("sizes", [[40, 40, 40, 13], [7], [3, 0, 5], [100] * 9])
@pytest.mark.parametrize("slots", [1, 2, 4, 6])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_exact_plan_gives_every_sample_once_and_every_slot_the_same_batches(sizes, slots, batch_size):
    total = sum(sizes)
    assert total >= slots  # every case has a sample per slot at least
    batches, plans = epoch_plan(sizes, slots, batch_size, seed=3, epoch=1, shuffle=True, drop_last=False)
    real = [sample[:2] for plan in plans for sample in expand(plan) if not sample[2]]
    assert sorted(real) == sorted((s, i) for s, n in enumerate(sizes) for i in range(n))
    for plan in plans:
        count = len(expand(plan))
        assert (batches - 1) * batch_size < count <= batches * batch_size
    pads = sum(sample[2] for plan in plans for sample in expand(plan))
    assert pads < slots


def test_drop_last_plan_gives_full_batches_only():
    batches, plans = epoch_plan([50, 50, 23], 4, 8, seed=0, epoch=0, shuffle=True, drop_last=True)
    assert batches == 3
    assert all(len(expand(plan)) == 24 for plan in plans)
    assert not any(seg.pad for plan in plans for seg in plan)


def test_plan_shuffles_shards_per_epoch_identically_everywhere():
    first = epoch_plan([10] * 8, 2, 4, seed=1, epoch=0, shuffle=True, drop_last=False)
    again = epoch_plan([10] * 8, 2, 4, seed=1, epoch=0, shuffle=True, drop_last=False)
    other = epoch_plan([10] * 8, 2, 4, seed=1, epoch=1, shuffle=True, drop_last=False)
    assert first == again and first != other


def test_plan_that_cannot_fill_a_batch_is_an_error():
    with pytest.raises(StreamError, match="cannot fill one batch"):
        epoch_plan([5], 4, 8, seed=0, epoch=0, shuffle=False, drop_last=True)


# streaming --------------------------------------------------------------------------------------


def test_one_epoch_yields_every_sample_of_the_split_once(synth_shards):
    split = Manifest.load(synth_shards).split("train")
    s = stream(synth_shards, batch_size=16, num_workers=2)
    batches = list(s)
    ids = ids_of(batches)
    assert len(ids) == split.samples == len(set(ids))
    assert len(batches) == len(s)
    batch = batches[0]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)
    assert batch["label"].tolist() == batch["labels"][:, 0].tolist()
    assert set(batch["label"].tolist()) <= {0, 1}
    assert s.epoch == 1 and s.batches_done == 0


def worker_pids() -> list[int]:
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [int(pid) for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "pt_data_worker"]


def test_workers_outlive_slurms_stop_signals_and_end_at_once_on_their_parents(synth_shards):
    """Slurm signals the whole job (here: another process sends them); the training may still need
    batches to reach its checkpoint. multiprocessing's exit terminates the workers from the parent."""
    s = stream(synth_shards, batch_size=16, num_workers=2)
    batches = iter(s)
    first = next(batches)
    workers = worker_pids()
    assert len(workers) == 2
    for signum in ("TERM", "USR2"):
        subprocess.run(["kill", f"-{signum}", *map(str, workers)], check=True)
    ids = ids_of([first, *batches])  # the whole epoch still arrives
    assert len(ids) == Manifest.load(synth_shards).split("train").samples
    assert worker_pids() == workers

    os.kill(workers[0], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (ended := os.waitid(os.P_PID, workers[0], os.WEXITED | os.WNOHANG | os.WNOWAIT)) is None:
        assert time.monotonic() < deadline, "the worker outlived its parent's SIGTERM"
        time.sleep(0.05)
    assert (ended.si_code, ended.si_status) == (os.CLD_EXITED, 0)


def test_workers_forked_by_a_thread_that_ended_keep_serving(synth_shards):
    """Linux sends the parent-death signal when the forking *thread* ends: the workers must not
    take a thread's end for their parent's (tests/faults/test_loader_faults.py kills the parent)."""
    s = stream(synth_shards, batch_size=16, num_workers=2)
    batches, first = iter(s), []
    forker = threading.Thread(target=lambda: first.append(next(batches)))
    forker.start()
    forker.join()
    time.sleep(0.5)  # a worker killed when the thread ended would be gone by now
    workers = worker_pids()
    assert len(workers) == 2
    ids = ids_of([*first, *batches])
    assert len(ids) == Manifest.load(synth_shards).split("train").samples
    assert worker_pids() == workers


@pytest.mark.parametrize(("world_size", "workers"), [(2, 0), (2, 2), (3, 2)])
def test_ranks_and_workers_cover_the_split_disjointly_with_equal_batch_counts(
    synth_shards, world_size, workers
):
    per_rank = [
        list(stream(synth_shards, batch_size=8, num_workers=workers, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    ids = [key for batches in per_rank for key in ids_of(batches)]
    assert Counter(ids).most_common(1)[0][1] == 1
    assert len(ids) == Manifest.load(synth_shards).split("train").samples


def test_unlabeled_split_has_label_minus_one(synth_shards):
    batch = next(iter(stream(synth_shards, "unlabeled")))
    assert (batch["label"] == -1).all()


def test_several_splits_stream_as_one(synth_shards):
    manifest = Manifest.load(synth_shards)
    s = stream(synth_shards, ["train", "unlabeled"], batch_size=8, drop_last=False, num_workers=2)
    ids = ids_of(list(s))
    assert len(ids) == len(set(ids)) == manifest.split("train").samples + manifest.split("unlabeled").samples
    assert sum(key.startswith("synthu") for key in ids) == manifest.split("unlabeled").samples
    assert s.state_dict()["split"] == "train+unlabeled"
    with pytest.raises(StreamError, match="split=.train"):
        stream(synth_shards, "train").load_state_dict(s.state_dict())


def test_same_seed_same_batches_other_seed_or_epoch_other_order(synth_shards):
    first = list(stream(synth_shards, num_workers=2, seed=5))
    again = list(stream(synth_shards, num_workers=2, seed=5))
    assert ids_of(first) == ids_of(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert ids_of(first) != ids_of(stream(synth_shards, num_workers=2, seed=6))
    two_epochs = stream(synth_shards, num_workers=2, seed=5)
    assert ids_of(list(two_epochs)) == ids_of(first)
    assert ids_of(list(two_epochs)) != ids_of(first)


def test_augmentation_depends_on_the_sample_not_on_the_worker_process_or_thread(synth_shards):
    """Augmentation is seeded per (seed, epoch, slot, position), not by process or thread state."""
    from memetrain.data.transforms import AssignmentAugment

    a = list(stream(synth_shards, view=AssignmentAugment(32), num_workers=2, shuffle=False))
    b = list(stream(synth_shards, view=AssignmentAugment(32), num_workers=2, shuffle=False))
    threads = list(stream(synth_shards, view=AssignmentAugment(32), num_workers=2, worker_kind="thread"))
    processes = list(stream(synth_shards, view=AssignmentAugment(32), num_workers=2))
    assert ids_of(a) == ids_of(b) and ids_of(threads) == ids_of(processes)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(threads, processes, strict=True))


@pytest.mark.parametrize(
    ("workers", "consumed", "kind"),
    [(0, 3, "process"), (2, 3, "process"), (2, 4, "thread"), (3, 7, "thread")],
)
def test_resume_continues_exactly_where_an_uninterrupted_stream_goes(synth_shards, workers, consumed, kind):
    settings = dict(batch_size=8, num_workers=workers, seed=11, shuffle_buffer=20)
    reference = stream(synth_shards, **settings)  # worker processes, whatever ``kind`` resumes with
    uninterrupted = list(reference) + list(reference)  # two epochs

    settings["worker_kind"] = kind
    first = stream(synth_shards, **settings)
    head = [batch for _, batch in zip(range(consumed), first)]
    state = first.state_dict()
    resumed = stream(synth_shards, **settings)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    combined = head + list(resumed) + list(resumed)  # the rest of epoch 0, then epoch 1
    assert len(combined) == len(uninterrupted)
    assert ids_of(combined) == ids_of(uninterrupted)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(combined, uninterrupted))


def test_resume_under_another_world_size_or_worker_count_is_refused(synth_shards):
    state = stream(synth_shards, num_workers=2).state_dict()
    with pytest.raises(StreamError, match="world_size=1.*world_size=2"):
        stream(synth_shards, num_workers=2, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(StreamError, match="num_workers"):
        stream(synth_shards, num_workers=3).load_state_dict(state)


def test_resume_on_re_packed_data_or_another_tokenizer_is_refused(synth_shards, tmp_path):
    from memetrain.data.tokenizer import train_wordpiece

    packed = TextEncoder(synth_shards / "tokenizer.json", max_length=12)
    state = json.loads(json.dumps(stream(synth_shards, text_encoder=packed).state_dict()))
    stream(synth_shards, text_encoder=packed).load_state_dict(state)  # the same data: resumes
    train_wordpiece(["other words entirely"] * 5, 50, tmp_path / "other.json")
    other = TextEncoder(tmp_path / "other.json", max_length=12)
    with pytest.raises(
        StreamError, match="the tokenizer file is not the one the checkpoint was trained with"
    ):
        stream(synth_shards, text_encoder=other).load_state_dict(state)
    root = copy_pack(synth_shards, tmp_path / "copy")
    retexted = lambda members: [(n, b"another text" if n.endswith(".txt") else d) for n, d in members]  # noqa: E731
    rewrite_shard(root, "train", retexted)  # then indexed anew
    with pytest.raises(
        StreamError, match="the split's shards are not the ones the checkpoint was trained on"
    ):
        stream(root, text_encoder=TextEncoder(root / "tokenizer.json", max_length=12)).load_state_dict(state)
    del state["shards"], state["tokenizer"]  # as saved before the stream kept them
    stream(synth_shards, text_encoder=other).load_state_dict(state)


def test_text_encoder_from_the_packed_tokenizer(synth_shards):
    encoder = TextEncoder(synth_shards / "tokenizer.json", max_length=24)
    s = MemeStream(synth_shards, "dev", StreamSettings(batch_size=4, num_workers=0), Resize(32), encoder)
    batch = next(iter(s))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
    assert (batch["input_ids"][:, 0] == encoder._fast.token_to_id("[CLS]")).all()
    assert encoder._fast.token_to_id("[UNK]") not in batch["input_ids"][0, 1:6].tolist()


@pytest.mark.parametrize("workers, subset", [(0, None), (2, None), (0, range(3, 200, 7))])
def test_stored_token_ids_are_padded_to_what_the_encoder_makes_of_the_texts(synth_shards, workers, subset):
    encoder = TextEncoder(synth_shards / "tokenizer.json", max_length=12)
    settings = StreamSettings(batch_size=8, num_workers=workers)
    s = MemeStream(synth_shards, ["train", "unlabeled"], settings, Resize(32), encoder, subset=subset)
    assert s.tokens is not None  # the packed tokenizer, uncleaned: the pack's ids are its ids
    batches = list(s)
    assert sum(len(batch["text"]) for batch in batches) >= s.num_samples
    for batch in batches:
        ids, mask = encoder(batch["text"])
        assert (
            batch["input_ids"].tolist() == ids.tolist() and batch["attention_mask"].tolist() == mask.tolist()
        )


def test_texts_are_tokenised_when_the_stored_ids_are_not_the_encoders(synth_shards, tmp_path):
    from memetrain.data.tokenizer import train_wordpiece

    train_wordpiece(["other words entirely"] * 5, 50, tmp_path / "other.json")
    packed = synth_shards / "tokenizer.json"
    for encoder in (TextEncoder(packed, 12, clean=True), TextEncoder(tmp_path / "other.json", 12)):
        s = MemeStream(synth_shards, "dev", StreamSettings(batch_size=4, num_workers=0), Resize(32), encoder)
        batch = next(iter(s))
        assert s.tokens is None
        assert batch["input_ids"].tolist() == encoder(batch["text"])[0].tolist()


# bad shards and samples -------------------------------------------------------------------------


def copy_pack(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def rewrite_shard(root: Path, split: str, edit) -> None:
    """Rewrite the first shard of ``split`` with ``edit(members) -> members``; the manifest and the
    sample index then agree with it."""
    path = root / Manifest.load(root).split(split).shards[0].name
    with tarfile.open(path) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
    members = edit(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    agree_manifest(root, split)


def test_corrupt_images_are_counted_logged_and_masked(synth_shards, tmp_path, caplog):
    root = copy_pack(synth_shards, tmp_path / "copy")

    def corrupt_two(members):
        images = [i for i, (name, _) in enumerate(members) if name.endswith(".jpg")]
        for i in images[:2]:
            members[i] = (members[i][0], b"\xff\xd8\xff garbage")
        return members

    rewrite_shard(root, "dev", corrupt_two)
    total = Manifest.load(root).split("dev").samples
    s = stream(root, "dev", batch_size=4, max_bad_samples=2)
    with caplog.at_level(logging.WARNING):
        batches = list(s)
    assert len(ids_of(batches)) == total - 2 and s.bad_samples == 2
    assert sum(len(batch["id"]) for batch in batches) == total  # their rows are kept, marked invalid
    assert "image cannot be decoded" in caplog.text and "synth" in caplog.text
    with pytest.raises(StreamError, match="over max_bad_samples=1"):
        list(stream(root, "dev", batch_size=4, max_bad_samples=1))
    threads = threading.active_count()
    with pytest.raises(StreamError, match="worker 0, over max_bad_samples=1"):  # raised in its thread
        list(stream(root, "dev", batch_size=4, max_bad_samples=1, num_workers=2, worker_kind="thread"))
    assert threading.active_count() == threads, "the worker threads must end with the error"


def corrupt_image_and_text(root: Path) -> list[str]:
    """Corrupt the third image and the fifth text of the train split's first shard; their keys."""
    keys = []

    def corrupt(members):
        images = [i for i, (name, _) in enumerate(members) if name.endswith(".jpg")]
        texts = [i for i, (name, _) in enumerate(members) if name.endswith(".txt")]
        for i, garbage in ((images[2], b"\xff\xd8\xff garbage"), (texts[4], b"\xff\xfe not UTF-8")):
            members[i] = (members[i][0], garbage)
            keys.append(members[i][0].split(".")[0])
        return members

    rewrite_shard(root, "train", corrupt)
    return keys


def views_of(batch) -> list[torch.Tensor]:
    return batch["views"] if "views" in batch else [batch["image"]]


@pytest.mark.parametrize(
    "view", [AssignmentAugment(32), MultiCrop(32, 16, local_crops=2)], ids=["one", "views"]
)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_bad_samples_row_repeats_a_good_one_marked_invalid_and_batches_keep_their_size(
    synth_shards, tmp_path, kind, view
):
    """Every rank's batches keep ``batch_size`` rows (DDP collectives need equal shapes); the other
    rows are those of a stream of the pack before the samples went bad (augmentation is seeded by
    position, which a bad sample no longer shifts)."""
    root = copy_pack(synth_shards, tmp_path / "copy")
    bad_keys = corrupt_image_and_text(root)
    settings = dict(view=view, batch_size=8, num_workers=2, worker_kind=kind, drop_last=True, seed=3)
    settings["text_encoder"] = TextEncoder(synth_shards / "tokenizer.json", max_length=12)
    clean = list(stream(synth_shards, **settings))
    bad_stream = stream(root, **settings)
    batches = list(bad_stream)
    assert bad_stream.bad_samples == 2 and len(batches) == len(clean)
    assert sorted(ids_of(batches)) == sorted(key for key in ids_of(clean) if key not in bad_keys)
    for batch, reference in zip(batches, clean):
        fields = [
            batch["id"],
            batch["text"],
            batch["label"],
            batch["labels"],
            batch["valid"],
            batch["input_ids"],
        ]
        assert {len(field) for field in fields + views_of(batch)} == {8}
        assert batch["valid"].tolist() == [key not in bad_keys for key in reference["id"]]
        for row, valid in enumerate(batch["valid"].tolist()):
            # a good row is the clean stream's; a bad one, whole, a copy of the batch's first good row
            source = row if valid else batch["valid"].tolist().index(True)
            for name in ("labels", "input_ids", "attention_mask"):
                assert torch.equal(batch[name][row], reference[name][source])
            for images, expected in zip(views_of(batch), views_of(reference), strict=True):
                assert torch.equal(images[row], expected[source])
            assert (
                batch["id"][row] == reference["id"][source]
                and batch["text"][row] == reference["text"][source]
            )


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_resume_is_exact_across_bad_samples(synth_shards, tmp_path, kind):
    root = copy_pack(synth_shards, tmp_path / "copy")
    corrupt_image_and_text(root)
    settings = dict(batch_size=8, num_workers=2, worker_kind=kind, seed=5, shuffle_buffer=20)
    reference = stream(root, **settings)
    uninterrupted = list(reference) + list(reference)
    first = stream(root, **settings)
    head = [batch for _, batch in zip(range(5), first)]
    resumed = stream(root, **settings)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    combined = head + list(resumed) + list(resumed)
    assert resumed.bad_samples == reference.bad_samples == 4  # two per epoch
    assert [batch["id"] for batch in combined] == [batch["id"] for batch in uninterrupted]
    assert [batch["valid"].tolist() for batch in combined] == [
        batch["valid"].tolist() for batch in uninterrupted
    ]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(combined, uninterrupted, strict=True))


def test_a_batch_of_bad_samples_only_is_an_error(synth_shards, tmp_path):
    root = copy_pack(synth_shards, tmp_path / "copy")
    garbage = lambda members: [(n, b"\xff\xd8\xff garbage" if n.endswith(".jpg") else d) for n, d in members]  # noqa: E731
    rewrite_shard(root, "dev", garbage)
    with pytest.raises(StreamError, match="every sample of a batch was bad .*the shards need fixing"):
        list(stream(root, "dev", batch_size=4, shuffle=False, max_bad_samples=1000))


def packed_images(shards: Path, split: str) -> dict[str, bytes]:
    """Each sample's image bytes as Python's tarfile reads them."""
    manifest, images = Manifest.load(shards), {}
    for shard in manifest.split(split).shards:
        with tarfile.open(manifest.shard_path(shard)) as tar:
            for info in tar.getmembers():
                key, extension = info.name.split(".", 1)
                if extension == "jpg":
                    images[key] = tar.extractfile(info).read()
    return images


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("size", [64, 32])  # the packed size (decoded into the batch), or resized
@pytest.mark.parametrize("native", [True, False])  # decode.decode_jpeg_rows, or one image at a time
def test_batch_rows_hold_each_samples_view_also_after_a_bad_sample(
    synth_shards, tmp_path, monkeypatch, caplog, workers, size, native
):
    assert decode._decode_rows is not None, "the native decoder was not built (setup.py): pip install -e ."
    root = copy_pack(synth_shards, tmp_path / "copy")
    in_place, fresh, decode_jpeg, empty_rgb = [], [], decode.simplejpeg.decode_jpeg, decode.empty_rgb
    in_rows, decode_rows = [], decode._decode_rows

    def counted_rows(images, rows, height, width):
        statuses = decode_rows(images, rows, height, width)
        in_rows.append(sum(statuses))
        return statuses

    monkeypatch.setattr(decode, "_decode_rows", counted_rows if native else None)

    def counted(data, *args, buffer=None, **kwargs):
        in_place.append(buffer is not None and not any(buffer is memory for memory in fresh))
        return decode_jpeg(data, *args, buffer=buffer, **kwargs)

    def allocated(height, width):
        fresh.append(empty_rgb(height, width))
        return fresh[-1]

    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", counted)  # seen here with workers=0
    monkeypatch.setattr(decode, "empty_rgb", allocated)

    def truncate_second_image(members):  # decoded part-way into its row before it fails
        second = [i for i, (name, _) in enumerate(members) if name.endswith(".jpg")][1]
        members[second] = (members[second][0], members[second][1][:-300])
        return members

    rewrite_shard(root, "dev", truncate_second_image)
    images, view = packed_images(root, "dev"), Resize(size)
    stream_module._warn_without_native_rows.cache_clear()
    with caplog.at_level(logging.WARNING):
        s = stream(root, "dev", view, batch_size=4, num_workers=workers, shuffle=False)
    assert ("native JPEG batch decoder was not built" in caplog.text) is not native
    batches = list(s)
    assert s.bad_samples == 1 and len(ids_of(batches)) == len(images) - 1
    for batch in batches:
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        assert batch["image"].data_ptr() % 32 == 16  # rows written through the cache (decode.cached_rows)
        for key, image in zip(batch["id"], batch["image"]):
            assert torch.equal(image, view(decode_rgb(images[key], view.decode_size)))
    if workers == 0 and size == 32:  # resized: nothing is decoded into the rows
        assert sum(in_place) == sum(in_rows) == 0
    elif workers == 0 and native:  # all but each batch's first image and the bad one, in one call per batch
        assert in_rows == [int(batch["valid"].sum()) - 1 for batch in batches] and sum(in_place) == 1
        # (the bad one, refused there, is retried one image at a time into its row, and fails again)
    elif workers == 0:  # all but each batch's first image, one at a time into its row
        assert sum(in_place) == len(images) - len(batches) and in_rows == []


def test_multi_view_batch_rows_hold_each_samples_views(synth_shards):
    view = MultiCrop(global_size=32, local_size=16, local_crops=2)
    batch = next(iter(stream(synth_shards, "dev", view, batch_size=4, seed=3)))
    images = packed_images(synth_shards, "dev")
    assert [tuple(v.shape) for v in batch["views"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    for offset, key in enumerate(batch["id"]):  # seeded from (seed, epoch, slot, position)
        expected = view(decode_rgb(images[key], view.decode_size), np.random.default_rng([3, 0, 0, offset]))
        assert all(torch.equal(views[offset], one) for views, one in zip(batch["views"], expected))


def test_a_view_whose_size_varies_between_samples_is_a_clear_error(synth_shards):
    class Uneven:
        random, decode_size, calls = False, None, 0

        def __call__(self, image, rng):
            self.calls += 1
            return image[:, :16, : 16 + self.calls % 2]

    message = r"made a \(3, 16, 16\) torch.uint8 image of sample 'synth\d+', unlike the \(3, 16, 17\)"
    with pytest.raises(StreamError, match=message + ".*a view must give every image one size"):
        next(iter(stream(synth_shards, "dev", Uneven(), batch_size=4)))


def test_members_with_foreign_extensions_are_never_decoded(synth_shards, tmp_path, caplog):
    root = copy_pack(synth_shards, tmp_path / "copy")
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # a pickle that runs a command

    def add_pickles(members):
        first_key = members[0][0].split(".")[0]
        return [(f"{first_key}.pickle", payload), (f"{first_key}.pyd", b"MZ")] + members

    with caplog.at_level(logging.WARNING):
        rewrite_shard(root, "dev", add_pickles)  # indexed: the members are seen, and never read
        ids = ids_of(list(stream(root, "dev", batch_size=4)))
    assert len(ids) == Manifest.load(root).split("dev").samples
    assert not marker.exists()
    assert "extension 'pickle' are never read" in caplog.text


def test_member_paths_that_climb_out_are_bad_samples(synth_shards, tmp_path):
    root = copy_pack(synth_shards, tmp_path / "copy")

    def climb(members):
        key = members[0][0].split(".")[0]
        return [
            (name.replace(key, "../../evil") if name.startswith(key) else name, data)
            for name, data in members
        ]

    rewrite_shard(root, "dev", climb)
    s = stream(root, "dev", batch_size=4)
    ids = ids_of(list(s))
    assert s.bad_samples == 1 and not any(".." in key for key in ids)


def test_manifest_checks_refuse_modified_missing_and_truncated_shards(synth_shards, tmp_path):
    root = copy_pack(synth_shards, tmp_path / "copy")
    shard = root / Manifest.load(root).split("dev").shards[0].name
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match its sha256"):
        stream(root, "dev")
    shard.write_bytes(bytes(data[:-1024]))
    with pytest.raises(ManifestError, match="truncated"):
        stream(root, "dev")
    shard.unlink()
    with pytest.raises(ManifestError, match="is missing"):
        stream(root, "dev")
    with pytest.raises(ManifestError, match="split 'nope' is not in"):
        stream(root, "nope")
    with pytest.raises(ManifestError, match="no manifest.json"):
        stream(tmp_path / "empty")


def test_truncated_shard_without_checks_is_a_stream_error(synth_shards, tmp_path):
    root = copy_pack(synth_shards, tmp_path / "copy")
    shard = root / Manifest.load(root).split("dev").shards[0].name
    shard.write_bytes(shard.read_bytes()[:5000])
    raw = json.loads((root / "manifest.json").read_text())
    raw["splits"]["dev"]["shards"][0]["bytes"] = 5000  # a manifest that agrees: only reading can tell
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="points outside its shards .*truncated"):
        MemeStream(
            root, "dev", StreamSettings(batch_size=4, num_workers=0, verify_checksums=False), Resize(32)
        )


def test_views_are_deterministic_in_their_generator():
    from memetrain.data.transforms import AssignmentAugment, MultiCrop, TwoViews

    image = torch.randint(0, 256, (3, 80, 60), dtype=torch.uint8)
    for view in (AssignmentAugment(32), TwoViews(32), MultiCrop(48, 16, local_crops=3)):
        a = view(image, np.random.default_rng(1))
        b = view(image, np.random.default_rng(1))
        c = view(image, np.random.default_rng(2))
        a, b, c = (x if isinstance(x, list) else [x] for x in (a, b, c))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(a, c))
    crops = MultiCrop(48, 16, local_crops=3)(image, np.random.default_rng(0))
    assert [tuple(c.shape) for c in crops] == [(3, 48, 48)] * 2 + [(3, 16, 16)] * 3


@pytest.mark.slow
def test_two_real_torchrun_ranks_split_the_epoch(synth_shards, tmp_path):
    import subprocess

    script = Path(__file__).with_name("stream_rank_script.py")
    command = torchrun(2)
    result = subprocess.run(
        [*command, str(script), str(synth_shards), str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"]
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])
    assert len(ranks[0]["ids"]) + len(ranks[1]["ids"]) == Manifest.load(synth_shards).split("train").samples


def test_subset_streams_exactly_the_chosen_samples(synth_shards):
    from memetrain.data.stream import split_labels

    labels = split_labels(synth_shards, "train")
    assert labels.shape == (Manifest.load(synth_shards).split("train").samples, 1)
    everything = list(stream(synth_shards, shuffle=False, batch_size=500))[0]
    chosen = np.flatnonzero(labels[:, 0] == 1)[::3]
    s = stream(synth_shards, num_workers=2, subset=chosen)
    ids = ids_of(list(s))
    assert sorted(ids) == sorted(everything["id"][i] for i in chosen)
    assert s.num_samples == len(chosen)
    other = stream(synth_shards, num_workers=2, subset=chosen[:-1])
    with pytest.raises(StreamError, match="subset"):
        other.load_state_dict(s.state_dict())


def test_a_manifest_naming_a_pipe_or_a_path_is_refused(synth_shards, tmp_path):
    root = copy_pack(synth_shards, tmp_path / "copy")
    raw = json.loads((root / "manifest.json").read_text())
    raw["splits"]["dev"]["shards"][0]["name"] = "pipe:curl -s http://example.invalid/x.tar"
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="not a file name in that directory"):
        stream(root, "dev")
    raw["splits"]["dev"]["shards"][0]["name"] = "../elsewhere/dev-000000.tar"
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="no pipe:, URLs or paths"):
        stream(root, "dev")
