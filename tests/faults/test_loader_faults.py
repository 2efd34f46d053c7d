"""Loader workers under faults: a training process killed with SIGKILL leaves no worker behind; a
shard truncated or rewritten while it is streamed ends the stream with one error naming it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from memetrain.data.manifest import Manifest
from memetrain.data.sample_index import SampleIndex
from memetrain.data.stream import MemeStream, StreamError, StreamSettings
from memetrain.data.transforms import Resize
from tests.helpers import REPO

CONSUMER = REPO / "tests" / "data" / "blocked_consumer_script.py"
WORKER_NAME = "pt_data_worker"  # what torch names its loader worker processes


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie nobody reaps (orphans go to pid 1, which in a container may not reap)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("forked_by", ["main", "thread"])
def test_no_loader_worker_outlives_a_sigkilled_training_process(synth_shards, forked_by):
    """The workers are blocked in their view (not waiting on torch's own parent check). ``thread``:
    they were forked by a thread that has since ended, which must not end them while the training
    lives."""
    consumer = subprocess.Popen(
        [sys.executable, str(CONSUMER), str(synth_shards), forked_by],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    workers: list[psutil.Process] = []
    try:
        line = consumer.stdout.readline()
        assert line.startswith("took a batch of 8"), line or consumer.stderr.read()[-3000:]
        time.sleep(1.5)  # the workers block in their view; a wrongly armed death signal would show by now
        workers = [child for child in psutil.Process(consumer.pid).children() if child.name() == WORKER_NAME]
        assert len(workers) == 2 and not any(ended(worker) for worker in workers)
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(ended(worker) for worker in workers):
            assert time.monotonic() < deadline, f"loader workers outlived their parent by 10 s: {workers}"
            time.sleep(0.1)
    finally:
        consumer.kill()
        consumer.wait()
        for worker in workers:  # what a failure left behind
            if not ended(worker):
                worker.kill()
        consumer.stdout.close()
        consumer.stderr.close()


def loader_workers() -> list[int]:
    return [child.pid for child in psutil.Process().children() if child.name() == WORKER_NAME]


def shard_of(root: Path, split: str, key: str) -> Path:
    """The shard that holds sample ``key``."""
    manifest = Manifest.load(root)
    index = SampleIndex.of_split(manifest, split)
    row = index.keys.tolist().index(key)
    shard = int(np.searchsorted(np.cumsum(index.shard_samples), row, side="right"))
    return manifest.shard_path(manifest.split(split).shards[shard])


@pytest.mark.parametrize("change", ["truncated", "overwritten"])
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_shard_changed_mid_epoch_ends_the_stream_with_one_error_naming_it(
    synth_shards, tmp_path, kind, change
):
    """Members are read for each batch: a mapped shard truncated under the stream killed it with
    SIGBUS; one overwritten in place (``cp``) fed it other samples' bytes at the old offsets. The
    workers end with the error."""
    root = Path(shutil.copytree(synth_shards, tmp_path / "copy"))
    workers_before = loader_workers(), threading.active_count()
    settings = StreamSettings(batch_size=4, num_workers=2, worker_kind=kind, prefetch_factor=2, seed=0)
    batches = iter(MemeStream(root, "train", settings, Resize(32)))
    first = next(batches)
    shard = shard_of(root, "train", first["id"][0])  # the shuffle buffer holds the rest of it
    if change == "truncated":
        os.truncate(shard, 1024)
    else:
        other = next(path for path in sorted(root.glob("train-*.tar")) if path != shard)
        shutil.copyfile(other, shard)
    with pytest.raises(StreamError) as raised:
        for _ in batches:
            pass
    message = str(raised.value)
    changed = f"shard {shard} changed while it was being read"
    if change == "truncated" and not message.startswith(changed):
        # a worker that opens the shard only after the cut reads a short tar, not a changed one
        # (which worker reaches it first depends on the machine's load)
        assert message == f"shard {shard} ends inside a member (truncated); re-pack it", message
    else:
        assert message.startswith(changed) and "restore it, or re-pack the split" in message, message
    assert (loader_workers(), threading.active_count()) == workers_before
