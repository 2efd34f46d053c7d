"""The shard reader against Python's tarfile: same members from every tar format, same refusals."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from memetrain.data.sample_index import SampleIndex
from memetrain.data.shard_reader import ShardFormatError, file_members, split_name
from tests.helpers import shard_infos


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int, extras: bool = False) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        if extras:
            directory = tarfile.TarInfo("somedir")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            link = tarfile.TarInfo("a-link")
            link.type, link.linkname = tarfile.SYMTYPE, "x" * 150
            tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tarfile_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar.getmembers() if i.isfile()]


def our_members(path: Path) -> list[tuple[str, bytes]]:
    with open(path, "rb") as handle:
        return [(name, handle.read(size)) for name, size in file_members(handle)]


MEMBERS = [
    ("s0.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("s0.txt", "héllo wörld".encode()),
    ("s1.json", b"{}"),
    ("s1.txt", b""),
    ("deep/" * 30 + "s2.jpg", b"x" * 513),  # a name over 100 bytes: GNU long name or pax path
    ("dir/sample-ü.txt", b"unicode name"),  # non-ASCII: a pax header in PAX format
    ("d" * 120 + "/s3.cls", b"1"),  # ustar: prefix field
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_every_tar_format_reads_as_tarfile_reads_it(tmp_path, fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or (len(m[0]) < 100 and m[0].isascii())]
    members += [("d" * 120 + "/s3.cls", b"1")] if fmt == tarfile.USTAR_FORMAT else []
    path = write_tar(tmp_path / "shard.tar", members, fmt, extras=fmt != tarfile.USTAR_FORMAT)
    assert our_members(path) == tarfile_members(path) == members


def test_pax_global_header_and_size_records_apply(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tar:
        info = tarfile.TarInfo("short.txt")
        info.size = 5
        info.pax_headers = {"path": "renamed/by-pax.txt"}
        tar.addfile(info, io.BytesIO(b"12345"))
    assert our_members(path) == tarfile_members(path) == [("renamed/by-pax.txt", b"12345")]


def test_bad_checksum_truncation_and_missing_end_marker_are_refused(tmp_path):
    path = write_tar(tmp_path / "shard.tar", MEMBERS[:4], tarfile.GNU_FORMAT)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        tar.getmembers()
        end_marker = tar.offset  # where the last member's data ends
    broken = tmp_path / "broken.tar"
    corrupt = bytearray(data)
    corrupt[512 * 3 + 10] ^= 0xFF  # inside the second member's header
    cases = {
        "bad checksum": bytes(corrupt),
        "ends inside a member": data[: 512 * 4 + 2],  # inside s0.txt, which the index reads
        "before the tar's end-of-archive marker": data[:end_marker],
        "ends before": b"",
    }
    for message, content in cases.items():
        broken.write_bytes(content)
        with pytest.raises(ShardFormatError, match=f"shard {re.escape(str(broken))} is corrupt or truncated"):
            try:
                SampleIndex.from_shards(tmp_path, shard_infos(broken), ["hateful"])
            except ShardFormatError as err:
                assert message in str(err), (message, str(err))
                raise


def test_split_name_agrees_with_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in ["a.jpg", "a.b.c", "dir.x/file.jpg", "a/.b", ".hidden", "noext", "x/y/", "a/b.c/d", "a//b.c"]:
        key, ext = base_plus_ext(name)
        assert split_name(name) == ((key, ext) if key is not None else (name, ""))
