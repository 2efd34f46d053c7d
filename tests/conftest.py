"""Shared fixtures: small SynthMemes packs written once per test session, a Slurm test cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, pack_synth

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU communication op (~30 s) on first use: once per checkout, here.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """240 labeled 64 px memes plus 40 unlabeled ones, about 40 per shard (several shards per split)."""
    return pack_synth(tmp_path_factory.mktemp("synth"), unlabeled=40)


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """A one-node Slurm cluster on localhost (``slurm/start_cluster.sh``, with accounting), its
    SLURM_CONF exported for the session; stopped at the end. Skipped without root or the Debian
    packages, unless MEMETRAIN_REQUIRE_SLURM=1 (CI installs them) makes that a failure."""
    tools = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    reason = "the Slurm tests need root" if os.geteuid() != 0 else ""
    if missing:
        reason = f"{', '.join(missing)} not installed"
    if reason:
        if os.environ.get("MEMETRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (MEMETRAIN_REQUIRE_SLURM=1)")
        pytest.skip(f"{reason}: apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server")
    state = Path(tempfile.mkdtemp(prefix="memetrain-slurm-"))  # not under pytest's rotating basetemp
    env = {**os.environ, "MEMETRAIN_SLURM_PORT_BASE": str(_free_ports(4))}
    started = subprocess.run(
        [REPO / "slurm" / "start_cluster.sh", state], env=env, capture_output=True, text=True, timeout=180
    )
    assert started.returncode == 0, f"{started.stdout}{started.stderr}"
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(state / "slurm.conf"))
    yield state
    patch.undo()
    subprocess.run([REPO / "slurm" / "stop_cluster.sh", state], capture_output=True, timeout=120)
    shutil.rmtree(state, ignore_errors=True)


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports nobody listens on now (the cluster's daemons)."""
    for base in range(21000, 60000, 97):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError("no free ports for the Slurm test cluster")


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per in-process test: steadier timings on a shared 2-core machine, and the
    same floating-point reductions every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
