"""The ``hub`` fixture: an empty Hugging Face cache of the test's own, read offline."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_TAG = "memetrain_test"  # a pretrained tag of the tiny architectures, registered by tiny_open_clip
TINY_REPO = "memetrain-test/tiny-clip"
TINY_MEAN, TINY_STD = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)


@dataclass
class Hub:
    home: Path  # HF_HOME
    cache: Path  # HF_HOME/hub, where the libraries look
    env: dict[str, str]  # the same for a subprocess (launcher/*.py)


@pytest.fixture
def hub(tmp_path, monkeypatch, offline) -> Hub:
    """HF_HOME (and TORCH_HOME) in ``tmp_path``, HF_HUB_OFFLINE=1, no network: here and for
    subprocesses (``hub.env``). huggingface_hub reads the variables once, at import, so its
    constants are set too: timm, transformers and open_clip all look them up there."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    env = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (home / "hub").mkdir(parents=True)
    return Hub(home, home / "hub", env)


@pytest.fixture
def tiny_open_clip(tmp_path, monkeypatch):
    """Tiny open_clip architectures ``memetrain-tiny`` and ``memetrain-tiny-quickgelu``, each with the
    pretrained tag ``memetrain_test`` (QuickGELU, statistics TINY_MEAN/TINY_STD) hosted on the hub
    as TINY_REPO, as open_clip lists its real ones; returns a function making random weights."""
    import open_clip
    from open_clip import pretrained

    for name, extra in (("memetrain-tiny", {}), ("memetrain-tiny-quickgelu", {"quick_gelu": True})):
        (tmp_path / f"{name}.json").write_text(json.dumps({**TINY_OPEN_CLIP, **extra}))
        open_clip.add_model_config(tmp_path / f"{name}.json")
        tag = {"hf_hub": f"{TINY_REPO}/", "mean": TINY_MEAN, "std": TINY_STD, "quick_gelu": True}
        monkeypatch.setitem(pretrained._PRETRAINED, name, {TINY_TAG: tag})

    def weights(seed: int = 1, name: str = "memetrain-tiny") -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        source = open_clip.create_model(name, init_logit_scale=math.log(50.0))
        with torch.no_grad():
            for key, param in source.named_parameters():
                if key != "logit_scale":
                    param.add_(torch.randn_like(param))  # nothing left at its default initialisation
        return {key: value.detach().clone() for key, value in source.state_dict().items()}

    return weights
