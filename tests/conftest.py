"""Shared fixtures: small SynthMemes packs written once per test session."""

from __future__ import annotations

import os
import socket
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
