"""Dataset readers. Each turns one on-disk layout (or the SynthMemes generator) into entries
and records; see :class:`memetrain.data.records.Source` for the interface."""

from __future__ import annotations

from typing import Any

from memetrain.data.records import Source
from memetrain.data.sources.folder import FolderSource
from memetrain.data.sources.hateful_memes import HatefulMemes
from memetrain.data.sources.mami import Mami
from memetrain.data.sources.synth import SynthMemes
from memetrain.errors import ConfigError

SOURCES: dict[str, type] = {
    "hateful_memes": HatefulMemes,
    "mami": Mami,
    "folder": FolderSource,
    "synth": SynthMemes,
}


def build_source(name: str, **options: Any) -> Source:
    """The source called ``name`` built from its options (the keys of its ``configs/source`` file)."""
    if name not in SOURCES:
        raise ConfigError(f"unknown source {name!r}; choose one of {', '.join(sorted(SOURCES))}")
    return SOURCES[name](**options)
