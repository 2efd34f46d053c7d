"""Bad data as a user meets it, through the real CLIs: bad memes at pack time (``launcher/pack.py``)
and damaged or hostile shards after it (``launcher/inspect_shards.py``, which streams a split the
way training does).

Each case is one row of a table: the fault, how it is injected, and the message expected; the exit
code is the table's. Bad memes (``PACK_CASES``) and bad samples (``SAMPLE_CASES``) are dropped,
named and counted, and the rest goes on (exit 0; ``strict=true`` makes bad memes fatal); a shard or
pack that cannot be trusted (``SHARD_CASES``) stops the run (exit 2). Everywhere: the message names
the meme, sample or file; nothing else is lost; no traceback and no hang (every process has a
timeout).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from memetrain.data.manifest import Manifest
from memetrain.data.sources.synth import write_hateful_memes_layout
from tests.faults.conftest import assert_one_clear_error, pickle_payload
from tests.helpers import agree_manifest, run_launcher

pytestmark = pytest.mark.slow

TIMEOUT = 180


def png(size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


BOMB = png((8200, 8200), "1")  # 8 KB on disk, 67 megapixels decoded: over the 64 MP limit
PICKLE_MARKER = "memetrain-fault-pickle-ran"


# -- at pack time: one Hateful Memes folder, one bad meme per case ------------------------------


@dataclass(frozen=True)
class PackCase:
    fault: str
    line: bytes  # the train.jsonl line
    image: bytes | None  # written to img/<id>.png unless None
    reason: str  # expected in the rejection (manifest.json and the pack's summary)
    id: str | None  # whom the rejection names: the meme id; None: its line (no id can be read)


def hm_line(id, text="a meme", label=0, img=None, **extra) -> bytes:
    fields = {"id": id, "img": img or f"img/{id}.png", "label": label, "text": text, **extra}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


PACK_CASES = [
    PackCase("corrupt JPEG", hm_line(91001), b"\xff\xd8\xff\xe0" + b"\x13" * 200, "image cannot be decoded", "91001"),
    PackCase("truncated PNG", hm_line(91002), png((64, 64))[:60], "image cannot be decoded", "91002"),
    PackCase("zero-byte image", hm_line(91003), b"", "is empty (0 bytes)", "91003"),
    PackCase("text file named .png", hm_line(91004), b"not an image", "is not a JPEG, PNG", "91004"),
    PackCase("decompression bomb", hm_line(91005), BOMB, "8200x8200 pixels, over the 64,000,000 pixel limit", "91005"),
    PackCase("missing image file", hm_line(91006), None, "image file img/91006.png not found", "91006"),
    PackCase("image path climbs out", hm_line(91007, img="../outside.png"), None, "leaves the dataset folder", "91007"),
    PackCase("absolute image path", hm_line(91008, img="/etc/hostname"), None, "leaves the dataset folder", "91008"),
    PackCase("image path is a folder", hm_line(91009, img="img"), None, "is a directory", "91009"),
    PackCase("non-UTF-8 text", hm_line(91010, text="caf_").replace(b"caf_", b"caf\xe9"), png(), "not valid UTF-8", "91010"),
    PackCase("empty text", hm_line(91011, text="   "), png(), "text is empty", "91011"),
    PackCase("no text field", hm_line(91012, text=...), png(), "no text", "91012"),
    PackCase("text not a string", hm_line(91013, text=7), png(), "text is a int", "91013"),
    PackCase("label 2", hm_line(91014, label=2), png(), "label 'hateful' is 2; expected 0 or 1", "91014"),
    PackCase("label 'yes'", hm_line(91015, label="yes"), png(), "label 'hateful' is 'yes'", "91015"),
    PackCase("label true", hm_line(91016, label=True), png(), "(a boolean)", "91016"),
    PackCase("duplicate id", hm_line(1, img="img/00001.png"), None, "duplicate id in split 'train'", "00001"),
    PackCase("malformed JSONL line", b'{"id": 91018, "img": "img/91018.png", "lab', None, "not valid JSON", None),
    PackCase("JSON array line", b"[91019, 1]", None, "a JSON list, expected an object", None),
    PackCase("no img field", hm_line(91020, img=...), None, "no 'img' field", "91020"),
    PackCase("no id field", b'{"img": "img/00001.png", "label": 0, "text": "x"}', None, "no 'id' field", None),
    PackCase("id with a slash", hm_line("a/b", img="img/91022.png"), None, "id may only hold letters", "a/b"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hateful_memes_with_faults(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """24 good memes in the Hateful Memes layout (ids 00000-00023), then one bad line (and image)
    per PackCase; returns the folder and, per fault, the id its rejection must name."""
    root = write_hateful_memes_layout(tmp_path_factory.mktemp("hm"), count=24, image_size=32, seed=3)
    lines = len((root / "train.jsonl").read_bytes().splitlines())
    named = {}
    with open(root / "train.jsonl", "ab") as handle:
        for number, case in enumerate(PACK_CASES, lines + 1):
            handle.write(case.line + b"\n")
            if case.image is not None:
                (root / "img" / f"{case.id}.png").write_bytes(case.image)
            named[case.fault] = case.id or f"line {number} of train.jsonl"
    return root, named


@pytest.fixture(scope="module")
def packed_with_faults(hateful_memes_with_faults, tmp_path_factory):
    output = tmp_path_factory.mktemp("packed")
    result = run_launcher(
        "pack.py", "source=hateful_memes", f"input={hateful_memes_with_faults[0]}", f"output={output}",
        "workers=2", timeout=TIMEOUT,
    )  # fmt: skip
    return result, output


@pytest.mark.parametrize("case", PACK_CASES, ids=[case.fault for case in PACK_CASES])
def test_a_bad_meme_is_rejected_by_id_with_its_reason(hateful_memes_with_faults, packed_with_faults, case):
    result, output = packed_with_faults
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rejected = {item["id"]: item["reason"] for item in Manifest.load(output).rejected}
    id = hateful_memes_with_faults[1][case.fault]
    assert id in rejected, f"{case.fault}: not rejected as {id!r}; rejections: {rejected}"
    assert case.reason in rejected[id], rejected[id]


def test_the_bad_memes_cost_nothing_else(packed_with_faults):
    result, output = packed_with_faults
    manifest = Manifest.load(output)
    assert len(manifest.rejected) == len(PACK_CASES)
    assert sum(split.samples for split in manifest.splits.values()) == 24
    assert f"rejected {len(PACK_CASES)} (all listed under 'rejected'" in result.stdout
    for item in manifest.rejected[:10]:  # the summary names the first ten, the manifest all
        assert f"  {item['split']} / {item['id']}: {item['reason']}" in result.stdout
    assert f"... and {len(PACK_CASES) - 10} more" in result.stdout


def test_strict_pack_of_bad_memes_fails_and_keeps_nothing(hateful_memes_with_faults, tmp_path):
    output = tmp_path / "strict"
    result = run_launcher(
        "pack.py", "source=hateful_memes", f"input={hateful_memes_with_faults[0]}", f"output={output}",
        "strict=true", timeout=TIMEOUT,
    )  # fmt: skip
    assert_one_clear_error(result, f"error: strict=true and {len(PACK_CASES)} record(s) were rejected")
    assert not [p for p in output.iterdir() if p.suffix in (".tar", ".json", ".tmp")]


# -- after packing: damaged and hostile shards ---------------------------------------------------

Members = list[tuple[str, bytes]]


def copy_pack(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def read_shard(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]


def write_shard(path: Path, members: Members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class SampleCase:
    """A fault in one sample of a shard: the stream drops that sample, names it, and goes on."""

    fault: str
    edit: Callable[[str, dict[str, bytes]], tuple[str, dict[str, bytes]]]  # (key, {ext: data}) -> same
    message: str  # expected in the warning that names the sample


def renamed(new_key: str):
    return lambda key, members: (new_key, members)


def replaced(extension: str, data: bytes | None):
    """The member with ``extension`` replaced by ``data`` (None: removed)."""

    def edit(key, members):
        members = {**members, extension: data}
        return key, {ext: value for ext, value in members.items() if value is not None}

    return edit


SAMPLE_CASES = [
    SampleCase("member path climbs out with ../", renamed("../../escaped"), "member path is absolute or climbs out"),
    SampleCase("absolute member path", renamed("/tmp/memetrain-absolute"), "member path is absolute"),
    SampleCase("corrupt JPEG", replaced("jpg", b"\xff\xd8\xff\xe0" + b"\x13" * 200), "image cannot be decoded"),
    SampleCase("zero-byte image", replaced("jpg", b""), "image member is empty"),
    SampleCase("decompression bomb", replaced("jpg", BOMB), "image is 8200x8200, over the 64,000,000 pixel limit"),
    SampleCase("no image member", replaced("jpg", None), "no image member"),
    SampleCase("non-UTF-8 text", replaced("txt", b"caf\xe9"), "txt member is not valid UTF-8"),
    SampleCase("empty text", replaced("txt", b"  "), "txt member is empty"),
    SampleCase("label 2", replaced("json", b'{"labels": {"hateful": 2}}'), "are not all 0 or 1"),
    SampleCase("label 'yes'", replaced("json", b'{"labels": {"hateful": "yes"}}'), "are not all 0 or 1"),
    SampleCase("malformed json member", replaced("json", b'{"labels": {"hat'), "json member is not a valid object"),
]  # fmt: skip

BATCH = 16
"""inspect_shards' batch size for the shard cases: with 2 workers, one batch per worker on the
32-sample dev shard, so no batch is all bad and each worker meets at most ``max_bad_samples``."""


def samples_of(members: Members) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: data}) in shard order."""
    grouped: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, extension = name.split(".", 1)
        grouped.setdefault(key, {})[extension] = data
    return list(grouped.items())


def members_of(samples: list[tuple[str, dict[str, bytes]]]) -> Members:
    return [(f"{key}.{ext}", data) for key, sample in samples for ext, data in sample.items()]


@pytest.fixture(scope="module")
def shards_with_bad_samples(synth_shards, tmp_path_factory):
    """The dev shard with one SampleCase per sample (spread over both workers' halves), a .pickle
    payload and a .pyd member beside a good sample; then ``inspect_shards.py`` over the split."""
    root = copy_pack(synth_shards, tmp_path_factory.mktemp("bad-samples") / "shards")
    marker = root.parent / PICKLE_MARKER
    path = root / Manifest.load(root).split("dev").shards[0].name
    samples = samples_of(read_shard(path))
    half = len(samples) // 2
    positions = [1 + i if i < 6 else half + i - 5 for i in range(len(SAMPLE_CASES))]
    bad_keys = {}
    for case, position in zip(SAMPLE_CASES, positions):
        samples[position] = case.edit(*samples[position])
        bad_keys[case.fault] = samples[position][0]
    key, first = samples[0]
    samples[0] = key, {**first, "pickle": pickle_payload(marker), "pyd": b"MZ\x90\x00"}
    write_shard(path, members_of(samples))
    agree_manifest(root, "dev")  # a pack that agrees with itself: only each sample's members are off
    result = run_launcher(
        "inspect_shards.py",
        f"shards={root}",
        "split=dev",
        f"batch_size={BATCH}",
        "grid=null",
        timeout=TIMEOUT,
    )
    return result, marker, bad_keys, len(samples)


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=[case.fault for case in SAMPLE_CASES])
def test_a_bad_sample_in_a_shard_is_dropped_and_named(shards_with_bad_samples, case):
    result, _, bad_keys, _ = shards_with_bad_samples
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stdout.splitlines() if "skipping bad sample" in line]  # its log
    named = [line for line in warnings if f"sample {bad_keys[case.fault]!r}:" in line]
    assert len(named) == 1 and case.message in named[0], f"{case.fault}: {warnings}"


def test_bad_samples_cost_nothing_else_and_pickles_never_run(shards_with_bad_samples):
    result, marker, _, samples = shards_with_bad_samples
    good = samples - len(SAMPLE_CASES)
    assert f"streamed {good} samples" in result.stdout and f"{len(SAMPLE_CASES)} bad samples" in result.stdout
    assert not marker.exists(), "a .pickle member was unpickled"
    assert not list(marker.parent.parent.rglob("escaped*")), "a member path wrote outside its shard"


DEV_SHARD = "dev-000000.tar"


def truncate(root: Path) -> None:
    path = root / DEV_SHARD
    path.write_bytes(path.read_bytes()[:-5000])


def cut_at_a_member_with_an_agreeing_manifest(root: Path) -> None:
    """Cut after the 10th member, at a header boundary (where a tar reader ends quietly), and make
    the manifest's size and sha256 agree: the sample index, made from the whole shard, can tell."""
    path = root / DEV_SHARD
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[10].offset
    path.write_bytes(path.read_bytes()[:offset])
    agree_manifest(root, "dev", reindex=False)


def flip_a_byte(root: Path) -> None:
    path = root / DEV_SHARD
    data = bytearray(path.read_bytes())
    data[3000] ^= 0xFF
    path.write_bytes(bytes(data))


def delete_the_shard(root: Path) -> None:
    (root / DEV_SHARD).unlink()


def break_the_manifest(root: Path) -> None:
    (root / "manifest.json").write_text('{"schema_version": 1, "splits": ')


def rename_in_manifest(name: str):
    def edit(root: Path) -> None:
        raw = json.loads((root / "manifest.json").read_text())
        raw["splits"]["dev"]["shards"][0]["name"] = name
        (root / "manifest.json").write_text(json.dumps(raw))

    return edit


def corrupt_most_images(root: Path) -> None:
    """11 of each worker's 16 images corrupt: past max_bad_samples=10, yet no batch all bad."""
    path = root / DEV_SHARD
    samples = samples_of(read_shard(path))
    for position in [*range(11), *range(16, 27)]:
        key, sample = samples[position]
        samples[position] = key, {**sample, "jpg": b"\xff\xd8\xff junk"}
    write_shard(path, members_of(samples))
    agree_manifest(root, "dev")


def merge_two_samples(root: Path) -> None:
    """The second sample renamed to the first one's key: the tar now holds one sample less."""
    path = root / DEV_SHARD
    samples = samples_of(read_shard(path))
    (first, _), (second, _) = samples[:2]
    write_shard(path, [(name.replace(second, first), data) for name, data in read_shard(path)])
    agree_manifest(root, "dev")  # indexed anew: one sample less than the manifest lists


@dataclass(frozen=True)
class ShardCase:
    """A fault that makes a split untrustworthy: the stream stops with one error, exit code 2."""

    fault: str
    inject: Callable[[Path], None] | None  # applied to a copy of the pack
    message: str
    shards: str | None = None  # the shards= option, when the fault is in it


SHARD_CASES = [
    ShardCase("truncated tar", truncate, "bytes, the manifest says"),
    ShardCase("tar cut at a member, manifest agrees", cut_at_a_member_with_an_agreeing_manifest, f"dev.index.npz was made from another {DEV_SHARD}"),
    ShardCase("sha256 mismatch", flip_a_byte, f"{DEV_SHARD} does not match its sha256 in the manifest"),
    ShardCase("manifest names a missing shard", delete_the_shard, f"{DEV_SHARD} listed in the manifest is missing"),
    ShardCase("manifest names a pipe: URL", rename_in_manifest("pipe:touch {marker}"), "reads shards only from the manifest's own directory (no pipe:"),
    ShardCase("manifest names a path outside", rename_in_manifest("../other/dev-000000.tar"), "'../other/dev-000000.tar' in"),  # and /abs: one check
    ShardCase("manifest is not JSON", break_the_manifest, "manifest.json is not a valid memetrain manifest"),
    ShardCase("more bad samples than max_bad_samples", corrupt_most_images, "11 bad samples on rank 0 worker 0, over max_bad_samples=10"),
    ShardCase("two samples merged by a repeated key", merge_two_samples, f"indexes 31 samples of {DEV_SHARD}, the manifest lists 32"),
    ShardCase("shards= is a pipe: command", None, "shards only from a local directory", shards="'pipe:touch {marker}'"),
    ShardCase("shards= is a URL", None, "shards only from a local directory", shards="https://example.invalid/shards"),
]  # fmt: skip


@pytest.mark.parametrize("case", SHARD_CASES, ids=[case.fault for case in SHARD_CASES])
def test_a_damaged_or_hostile_pack_stops_with_one_error(synth_shards, tmp_path, case):
    marker = tmp_path / "pipe-ran"  # a pipe: that ran would create it
    if case.shards:
        shards = case.shards.format(marker=marker)
    else:
        shards = copy_pack(synth_shards, tmp_path / "shards")
        case.inject(shards)
        raw = (shards / "manifest.json").read_text().replace("{marker}", str(marker))
        (shards / "manifest.json").write_text(raw)
    result = run_launcher(
        "inspect_shards.py",
        f"shards={shards}",
        "split=dev",
        f"batch_size={BATCH}",
        "grid=null",
        timeout=TIMEOUT,
    )
    assert_one_clear_error(result, case.message)
    assert not marker.exists()
