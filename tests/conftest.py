"""Shared fixtures: small SynthMemes packs written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import pack_synth

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """240 labeled 64 px memes plus 40 unlabeled ones, about 40 per shard (several shards per split)."""
    return pack_synth(tmp_path_factory.mktemp("synth"), unlabeled=40)
