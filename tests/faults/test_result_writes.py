"""A result is whole or absent. results.json, the predictions, the plots (memetrain.fileio's atomic
writer) and the model bundle (its atomic directory) are written beside their place and renamed, so
a disk that fills while one is written, or a process killed mid-write, leaves the previous file (or
none) and no partial one; the collector then lists the job as having no results and tables the rest.

Real files on a real filesystem: a size-limited tmpfs filled to the last byte, and a writer process
SIGKILLed once it has written half of a results.json.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memetrain.bundle import BundleContents, write_bundle
from memetrain.fileio import atomic_write_json
from memetrain.sweep.collect import collect_sweep
from tests.helpers import REPO
from tests.sweep.test_collector import grid_job, markdown_rows, write_sweep


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to its last byte; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush at close
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def sweep_on_a_small_disk(small_filesystem):
    """A sweep of two jobs (seeds 0 and 1) on a 2 MiB tmpfs; job 1's results.json not written yet."""
    sweep = small_filesystem("2m") / "sweep"
    jobs = [grid_job(sweep, {"model": "lstm"}, seed) for seed in (0, 1)]
    write_sweep(sweep, jobs)
    pending = sweep / jobs[1]["name"] / "results.json"
    results = json.loads(pending.read_text())
    pending.unlink()
    return sweep, jobs, results


def test_a_results_json_written_on_a_full_disk_leaves_none_and_the_job_is_listed(sweep_on_a_small_disk):
    sweep, jobs, results = sweep_on_a_small_disk
    run_dir = sweep / jobs[1]["name"]
    filler = fill(sweep.parent)
    with pytest.raises(OSError) as raised:
        atomic_write_json(run_dir / "results.json", results)  # as run.py writes it
    assert raised.value.errno == errno.ENOSPC
    assert not (run_dir / "results.json").exists()
    assert leftovers(run_dir) == [], "the failed write left its temporary file"

    # a results.json already there stays as it was, byte for byte
    done = sweep / jobs[0]["name"] / "results.json"
    before = done.read_bytes()
    with pytest.raises(OSError):
        atomic_write_json(done, {**results, "steps": 99})
    assert done.read_bytes() == before and leftovers(done.parent) == []

    filler.unlink()  # the collector writes its tables into the sweep
    markdown = collect_sweep(sweep)
    assert markdown_rows(markdown)["method=supervised model=lstm"][0] == "1 of 2"
    assert f"- `lstm-seed1` (seed 1): done but {run_dir}/results.json is missing" in markdown


WRITE_HALF_AND_WAIT = """
import sys, time
from memetrain.fileio import atomic_writer
with atomic_writer(sys.argv[1], "w") as handle:
    text = open(sys.argv[2]).read()
    handle.write(text[: len(text) // 2])
    handle.flush()
    print("half written", flush=True)
    time.sleep(600)
"""


def test_a_writer_killed_mid_write_leaves_no_results_json_and_the_job_is_listed(
    sweep_on_a_small_disk, tmp_path
):
    sweep, jobs, results = sweep_on_a_small_disk
    run_dir = sweep / jobs[1]["name"]
    (tmp_path / "results.json").write_text(json.dumps(results, indent=2))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_HALF_AND_WAIT, str(run_dir / "results.json"), str(tmp_path / "results.json")],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert writer.stdout.readline() == "half written\n"
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert not (run_dir / "results.json").exists()
    [partial] = leftovers(run_dir)  # hidden: .results.json.<random>.tmp, which no reader looks for
    assert partial.startswith(".results.json.") and partial.endswith(".tmp")
    assert (run_dir / partial).stat().st_size > 0, "the kill came before the write"
    markdown = collect_sweep(sweep)
    assert markdown_rows(markdown)["method=supervised model=lstm"][0] == "1 of 2"
    assert f"- `lstm-seed1` (seed 1): done but {run_dir}/results.json is missing" in markdown


def bundle_contents() -> BundleContents:
    return BundleContents(
        method="supervised", method_options={}, model={}, label_names=["label"], main_label="label",
        vocab_size=50, pad_id=0, image_size=32, interpolation="bilinear", max_length=8, clean_text=True,
        head=None, targets=[], thresholds=[], source={},
    )  # fmt: skip


def test_a_bundle_written_on_a_full_disk_keeps_the_old_one_and_leaves_no_partial_files(small_filesystem):
    disk = small_filesystem("4m")
    bundle = write_bundle(disk / "model", bundle_contents(), {"w": torch.zeros(4)}, tokenizer=None)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 2**20))  # 1 MiB left: the new weights (2 MiB) do not fit
    with pytest.raises(Exception) as raised:
        write_bundle(disk / "model", bundle_contents(), {"w": torch.zeros(2**19)}, tokenizer=None)
    assert (
        "No space left on device" in str(raised.value) or getattr(raised.value, "errno", None) == errno.ENOSPC
    )
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before, "the old bundle changed"
    assert leftovers(disk) == [], "the failed bundle's partial files were left taking the space"
