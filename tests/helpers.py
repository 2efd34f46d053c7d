"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from memetrain.data.pack import PackOptions, pack
from memetrain.data.sources.synth import SynthMemes

REPO = Path(__file__).resolve().parents[1]


def pack_synth(output: Path, count: int = 240, image_size: int = 64, per_shard: int = 40, **source) -> Path:
    """Pack SynthMemes in-process into ``output`` (several shards per split by default)."""
    options = dict(count=count, image_size=image_size, seed=0, **source)
    pack(SynthMemes(**options), output, PackOptions(max_samples_per_shard=per_shard, workers=1), options)
    return output


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
