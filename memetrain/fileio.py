"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

A write that fails (a full disk: ENOSPC) or is killed leaves the old file as it was and at most a
hidden temporary (``.<name>.*.tmp``) that no reader looks for; the failure is raised (OSError).
:func:`atomic_directory` does the same for a directory of files (the model bundle)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any error (or SIGKILL) the temporary file is removed or left as ``.<name>.*.tmp``,
    which no reader looks for, and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # mode 0o666 less the umask, as open() would give (mkstemp's 0o600 hides a pack from its group)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path`` to write files into; on success fsync
    them and put the directory in place of ``path`` (an old one is removed first: a reader sees
    the old directory, none, or the whole new one, never part of one).

    On any error the temporary directory is removed, giving its space back, and ``path`` is left
    as it was; a SIGKILL leaves it as ``.<name>.tmp``, which the next write replaces.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        for directory in [*(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
            _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX needs the directory entry flushed)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
