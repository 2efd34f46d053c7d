"""Shared fixtures: small SynthMemes packs written once per test session, a Slurm test cluster,
a tiny finished run and its model bundle."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, pack_synth, reset_accelerate, run_launcher, skip_or_fail, tiny_run_overrides

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs one pytest worker per core: the runs each starts share it with the other's
    os.environ["OMP_NUM_THREADS"] = "1"
# DeepSpeed compiles its CPU communication op (~30 s) on first use: once per checkout, here.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """240 labeled 64 px memes plus 40 unlabeled ones, about 40 per shard (several shards per split)."""
    return pack_synth(tmp_path_factory.mktemp("synth"), unlabeled=40)


@pytest.fixture(scope="session")
def synth_hard_shards(tmp_path_factory) -> Path:
    """160 hard SynthMemes at 48 px with their attribute columns (image_class, ...), 40 per shard,
    plus 16 unlabeled: enough of each class for the attribute probes."""
    return pack_synth(
        tmp_path_factory.mktemp("synth_hard"), count=160, image_size=48, per_shard=40, difficulty="hard",
        attributes=True, unlabeled=16,
    )  # fmt: skip


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """A one-node Slurm cluster on localhost (``slurm/start_cluster.sh``, with accounting), its
    SLURM_CONF exported for the session; stopped at the end. Skipped without root or the Debian
    packages, failed instead under MEMETRAIN_NO_SKIPS=1 (CI installs them; :func:`skip_or_fail`)."""
    tools = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        skip_or_fail("the Slurm tests need root")
    if missing:
        skip_or_fail(
            f"{', '.join(missing)} not installed: apt-get install munge slurmctld slurmd slurm-client "
            "slurmdbd mariadb-server"
        )
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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's state lives in process-wide singletons: an in-process test's Accelerator (its
    precision, accumulation steps, device) is forgotten after the test, so the next builds its own."""
    yield
    if "accelerate.state" in sys.modules:  # a test that never imported Accelerate has none to reset
        reset_accelerate()


@pytest.fixture(scope="session")
def finished_run(synth_shards, tmp_path_factory) -> Path:
    """The default model (concat fusion: ResNet-18 + LSTM) trained for a few steps, evaluated by its
    classifier and a linear probe."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, run_dir, steps=6), "eval.tsne=false",
        "eval.protocols=[classifier,linear_probe]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def bundle(finished_run, tmp_path_factory) -> Path:
    """The run's bundle, alone, where nothing of the run is."""
    return Path(shutil.copytree(finished_run / "model", tmp_path_factory.mktemp("elsewhere") / "bundle"))


# -- parallel runs (pytest-xdist, `make test`) -------------------------------------------------------

SLURM_CLUSTER_FILES = ("tests/sweep/test_chaos.py", "tests/sweep/test_slurm_sweep.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Each test file runs whole on one worker (its module fixtures are built once), and the files
    that use the Slurm cluster run on the same one: one cluster per machine (its munge and
    MariaDB daemons are the host's), started once."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order of the files

    class OneSlurmCluster(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "slurm cluster" if path in SLURM_CLUSTER_FILES else path

    return OneSlurmCluster(config, log)


def pytest_collection_modifyitems(config, items):
    """The Slurm cluster's files first (one scope, the longest), then the files with the most slow
    tests, so that under xdist the fast ones fill the workers' last minutes (the scheduler hands
    files out in this order); and every test that starts the cluster is in SLURM_CLUSTER_FILES."""
    stray = [item.nodeid for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())
             and item.nodeid.split("::")[0] not in SLURM_CLUSTER_FILES]  # fmt: skip
    if stray:
        raise pytest.UsageError(f"add their files to SLURM_CLUSTER_FILES in tests/conftest.py: {stray}")
    slow = collections.Counter(
        item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")
    )
    first = len(items) + 1  # above any file's count

    def weight(item) -> int:
        path = item.nodeid.split("::")[0]
        return first if path in SLURM_CLUSTER_FILES else slow[path]

    items.sort(key=lambda item: -weight(item))
