"""Fixtures of the methods over frozen CLIP features (SemiMemes, TIB-VA, CMML-CLIP)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.methods.test_clip import clip


@pytest.fixture
def clip_weights(tmp_path):
    """A CLIP method's state dict (the small test towers, random weights), as a CLIP run's
    checkpoint holds it, and the CLIP itself."""
    torch.manual_seed(0)
    model = clip(embed_dim=16)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model
