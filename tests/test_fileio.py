"""Atomic writes: the old content or the whole new one, never a part, with the usual permissions."""

from __future__ import annotations

import os

import pytest

from memetrain.fileio import atomic_write_text, atomic_writer


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_writer(path, "w") as handle:
        handle.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_written_files_get_the_umask_permissions_like_any_other_file(tmp_path):
    """A manifest or a results.json on shared storage is readable by whoever may read the folder."""
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}\n")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == (
        tmp_path / "plain.txt"
    ).stat().st_mode & 0o777
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644
