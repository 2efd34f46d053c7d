"""The members of a WebDataset tar shard, read without Python's ``tarfile``.

``tarfile`` builds a ``TarInfo`` per member (every field converted, an extraction file object per
read). Here each 512-byte header yields only what a shard needs, the member's name (ustar
prefix, GNU long name, pax ``path``), its size (octal, base-256 or pax ``size``) and its type;
the header checksum is verified as ``tarfile`` does, data nobody reads is seeked past, and a file
that ends before the end-of-archive marker is refused as truncated. Sparse members, which no
WebDataset writer produces, are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

MAX_MEMBER_BYTES = 64 << 20
"""A larger member is never read: its sample is recorded as one that cannot be streamed."""

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs
_POSIX_MAGIC = b"ustar\x0000"
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class ShardFormatError(ValueError):
    """The bytes are not a well-formed tar archive (or end before its end-of-archive marker), or
    no longer the ones its sample index describes (``sample_index.ShardFile``)."""


def split_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, as WebDataset splits it: the key ends at the
    first '.' of the last path component; a name without one is its own key, extension ''."""
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    if dot > start:  # what the regular expression matches first, found without it
        return name[:dot], name[dot + 1 :]
    match = _KEY_AND_EXTENSION.match(name)  # a last component that starts with '.', or no '.'
    return match.groups() if match else (name, "")


def file_members(handle: BinaryIO) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file in the tar read from ``handle``, in archive order.

    When a pair is yielded the handle stands at the member's data, which the caller may read;
    the next pair is looked for after the data however far the caller read.
    """
    pax_global: dict[str, str] = {}
    long_name, pax = None, {}
    offset = 0
    while True:
        handle.seek(offset)
        header = handle.read(BLOCK)
        if header == _ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise ShardFormatError("the file ends before the tar's end-of-archive marker")
        _check_checksum(header, offset)
        kind = header[156:157]
        size = _number(header[124:136], "size", offset)
        if size < 0:
            raise ShardFormatError(f"the tar header at byte {offset} has a negative size")
        data_at = offset + BLOCK
        if kind in (b"L", b"K", b"x", b"g"):  # metadata for the next member, stored as this one's data
            if size > MAX_MEMBER_BYTES:
                raise ShardFormatError(f"the tar header at byte {offset} announces {size} bytes of metadata")
            data = read_data(handle, size)
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind != b"K":  # K: a long link target; links are not files, so it is not kept
                (pax if kind == b"x" else pax_global).update(_pax_records(data, data_at))
            offset = data_at + _padded(size)
            continue
        if kind == b"S":
            raise ShardFormatError(f"the member at byte {offset} is a sparse file, which no shard holds")
        name = long_name or _header_name(header)
        if pax or pax_global:
            fields = {**pax_global, **pax}
            name = fields.get("path", name)
            size = _number(fields.get("size", str(size)).encode(), "pax size", offset, base=10)
            if size < 0:
                raise ShardFormatError(f"the pax header before byte {offset} has a negative size")
        long_name, pax = None, {}
        if kind in _NO_DATA_TYPES:
            offset = data_at  # as tarfile: no data follows these, whatever their size field says
            continue
        offset = data_at + _padded(size)  # unknown types are skipped by their size, as tarfile does
        if kind in _FILE_TYPES:
            yield name, size


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def read_data(handle: BinaryIO, size: int) -> bytes:
    """The next ``size`` bytes of a member's data; a file that ends sooner is truncated."""
    data = handle.read(size)
    if len(data) < size:
        raise ShardFormatError("the file ends inside a member (truncated)")
    return data


def _check_checksum(header: bytes, offset: int) -> None:
    """The header checksum as tarfile accepts it: the unsigned or the signed byte sum, with the
    checksum field itself counted as eight spaces."""
    stored = _number(header[148:156], "checksum", offset)
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return
    high = sum(1 for byte in header[:148] + header[156:] if byte > 127)
    if stored != unsigned - 256 * high:
        raise ShardFormatError(f"the tar header at byte {offset} has a bad checksum (not a tar, or corrupt)")


def _number(field: bytes, what: str, offset: int, base: int = 8) -> int:
    """A numeric header field: NUL/space-terminated octal, or base-256 (GNU) for large values."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (256 ** (len(field) - 1)) if field[:1] == b"\xff" else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", base)
    except ValueError:
        raise ShardFormatError(
            f"the tar header at byte {offset} has an invalid {what} field {field!r}"
        ) from None


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:265] == _POSIX_MAGIC:
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position : position + 1] != b"\0":
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise ShardFormatError(f"the pax header at byte {offset} is malformed") from None
        record = data[space + 1 : position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ShardFormatError(f"the pax header at byte {offset} is malformed")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records
