"""Weights saved by us load through the config into the right encoder, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, build_method
from memetrain.models import ImageEncoder

MODEL = {
    "image": {
        "name": "resnet18",
        "image_size": 32,
        "pretrained": None,
        "grad_checkpointing": False,
        "freeze": False,
    },
    "text": {"kind": "lstm", "vocab_size": None, "embed_dim": 8, "hidden_size": 8},
    "head": {"kind": "concat", "hidden_dim": 16},
}
INFO = DataInfo(["hateful"], "hateful", vocab_size=50)


def test_timm_weights_file_in_model_image_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    source = ImageEncoder("resnet18")
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, tmp_path / "r18.safetensors")
    model = {**MODEL, "image": {**MODEL["image"], "pretrained": str(tmp_path / "r18.safetensors")}}
    method = build_method("supervised", {}, model, INFO)
    loaded = method.model.image_encoder.model.state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in source.model.state_dict().items())


def test_our_own_checkpoint_in_method_init(tmp_path):
    torch.manual_seed(2)
    trained = build_method("supervised", {}, MODEL, INFO)
    state = {f"model.{k}": v.contiguous() for k, v in trained.model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    init = {
        "image": {"path": str(tmp_path / "model.safetensors"), "prefix": "model.image_encoder."},
        "text": {"path": str(tmp_path / "model.safetensors"), "prefix": "model.text_encoder."},
    }
    torch.manual_seed(3)
    fresh = build_method("supervised", {"init": init}, MODEL, INFO)
    for part in ("image_encoder", "text_encoder"):
        ours, theirs = getattr(fresh.model, part).state_dict(), getattr(trained.model, part).state_dict()
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert not torch.equal(fresh.model.head.output.weight, trained.model.head.output.weight)


def test_init_with_a_wrong_prefix_names_what_the_file_has(tmp_path):
    save_file({"model.head.output.weight": torch.zeros(1, 2)}, tmp_path / "model.safetensors")
    init = {"image": {"path": str(tmp_path / "model.safetensors"), "prefix": "image_tower."}, "text": None}
    with pytest.raises(ConfigError, match="no names under prefix 'image_tower.'"):
        build_method("supervised", {"init": init}, MODEL, INFO)
