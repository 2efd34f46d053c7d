"""What the fault tests share: one uninterrupted reference run, size-limited filesystems, and the
check that a failure reached the user as one clear line."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, run_launcher, skip_or_fail, tiny_run_overrides

FAULTY_TRAIN = REPO / "tests" / "faults" / "train_with_faulty_methods.py"
STEPS = 12


def fault_run_overrides(shards: Path, run_dir: Path, steps: int = STEPS) -> list[str]:
    """A tiny run (seconds of training): checkpoints every 3 steps, all kept, a metrics row per step,
    timm's 0.4 M-parameter ``test_resnet`` with the LSTM (dropout and batch norm: RNG and buffers
    that an inexact resume would show), and no evaluation (the faults are in training)."""
    return [
        *tiny_run_overrides(shards, run_dir, steps),
        "model.image.name=test_resnet",
        "trainer.log_every=1",
        "trainer.keep_checkpoints=5",
        "eval.protocols=[]",
    ]


def run_faulty(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``launcher/train.py`` with the test-only fault-injecting methods registered."""
    import os

    return subprocess.run(
        [sys.executable, str(FAULTY_TRAIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def assert_one_clear_error(result: subprocess.CompletedProcess, fragment: str, code: int = 2) -> None:
    """The process failed with ``code`` and told why in ``fragment``, without a traceback."""
    assert result.returncode == code, f"exit code {result.returncode}, stderr:\n{result.stderr[-3000:]}"
    assert fragment in result.stderr, f"{fragment!r} not in stderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def pickle_payload(marker: Path) -> bytes:
    """A pickle that runs ``touch marker`` when unpickled (protocol 0, by hand: nothing of ours)."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_same_weights(expected: Path, got: Path) -> None:
    a, b = weights(expected), weights(got)
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, f"{got.name}: {len(differ)} tensors differ from the reference, e.g. {differ[:3]}"


@pytest.fixture(scope="session")
def reference_run(synth_shards, tmp_path_factory) -> Path:
    """The fault runs' configuration, never interrupted: checkpoints 3, 6, 9 and 12 to compare with."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.fixture
def small_filesystem(tmp_path):
    """``make(size)``: a directory on a fresh tmpfs of ``size`` (e.g. "16m"), so that writes fail
    with ENOSPC as on a full disk. Needs root: skipped without it, failed under MEMETRAIN_NO_SKIPS=1
    (CI runs as root); unmounted afterwards."""
    mounts = []

    def make(size: str, read_only: bool = False) -> Path:
        target = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            skip_or_fail(f"a size-limited tmpfs needs mount rights (root): {mounted.stderr.strip()}")
        mounts.append(target)
        return target

    yield make
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], check=False)
