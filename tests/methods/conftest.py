"""Fixtures of the methods over frozen CLIP features (SemiMemes, TIB-VA, CMML-CLIP)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from memetrain.data.manifest import Manifest
from memetrain.data.tokenizer import TextEncoder
from memetrain.methods import DataInfo, build_method
from tests.methods.test_clip import SMALL, clip


@pytest.fixture
def clip_weights(tmp_path):
    """A CLIP method's state dict (the small test towers, random weights), as a CLIP run's
    checkpoint holds it, and the CLIP itself."""
    torch.manual_seed(0)
    model = clip(embed_dim=16)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@pytest.fixture
def synth_clip(synth_shards, tmp_path):
    """Random small CLIP weights for the vocabulary of the SynthMemes pack, with what reads it:
    ``(weights path, DataInfo, TextEncoder)``."""
    manifest = Manifest.load(synth_shards)
    encoder = TextEncoder(synth_shards / manifest.tokenizer, max_length=24)
    info = DataInfo(manifest.label_names, manifest.main_label, encoder.vocab_size, encoder.pad_id)
    torch.manual_seed(0)
    model = build_method("clip", {"embed_dim": 16}, SMALL, info)
    path = tmp_path / "synth_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, info, encoder
