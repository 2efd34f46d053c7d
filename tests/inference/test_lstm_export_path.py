"""The LSTM text tower's ONNX path (no packed sequences, no stable sort) gives the packed path's
features: right, left and no padding, and a text without tokens."""

from __future__ import annotations

import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.models.text import LSTMTextEncoder


def test_the_onnx_path_gives_the_packed_features():
    torch.manual_seed(0)
    encoder = LSTMTextEncoder(50, embed_dim=16, hidden_size=8, num_layers=2).eval()
    ids = torch.randint(1, 50, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[0, 4:] = 0  # right padding
    mask[1, :] = 0  # no token at all
    mask[2, :2] = 0  # left padding
    mask[3, 1:3] = 0  # a gap
    with torch.no_grad():
        torch.testing.assert_close(encoder._without_packing(ids, mask), encoder(ids, mask), rtol=0, atol=1e-6)


def test_a_bidirectional_tower_is_refused_for_onnx():
    encoder = LSTMTextEncoder(50, embed_dim=16, hidden_size=8, bidirectional=True)
    with pytest.raises(ConfigError, match="format=torchscript"):
        encoder._without_packing(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
