"""load_weights: strict, prefix-aware, safetensors or torch files, never unpickling objects."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from memetrain.errors import ConfigError
from memetrain.models import MLPHead, load_weights, read_state_dict


def head(seed: int) -> MLPHead:
    torch.manual_seed(seed)
    return MLPHead(4, 2, hidden_dim=3, depth=1)


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_round_trip(tmp_path, suffix):
    source, target = head(0), head(1)
    path = tmp_path / f"head{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    load_weights(target, path)
    assert_same(source, target)


def test_prefix_selects_a_submodule_of_a_flat_file(tmp_path):
    source, target = head(0), head(1)
    state = {f"head.{name}": value for name, value in source.state_dict().items()}
    state["encoder.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    load_weights(target, tmp_path / "model.safetensors", prefix="head.")
    assert_same(source, target)


def test_prefix_reaches_into_a_nested_training_checkpoint(tmp_path):
    source, target = head(0), head(1)
    checkpoint = {"model": {"head": source.state_dict()}, "step": 7, "optimizer": {"state": {}}}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    load_weights(target, tmp_path / "checkpoint.pt", prefix="model.head.")
    assert_same(source, target)


def test_mismatch_lists_counts_and_examples(tmp_path):
    state = head(0).state_dict()
    state.pop("output.bias")
    state["extra.weight"] = torch.zeros(1)
    state["hidden.0.weight"] = torch.zeros(5, 4)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError) as error:
        load_weights(head(1), tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "1 missing (output.bias)" in message and "1 unexpected (extra.weight)" in message
    assert "1 wrong shape (hidden.0.weight (5, 4) vs (3, 4))" in message


def test_unknown_prefix_lists_the_prefixes_there(tmp_path):
    save_file({f"head.{k}": v for k, v in head(0).state_dict().items()}, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match=r"no names under prefix 'backbone\.'.*head\."):
        load_weights(head(1), tmp_path / "m.safetensors", prefix="backbone.")


class Payload:
    """Any pickled object that is not a tensor or a plain container."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(1), "object": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ConfigError, match="cannot be read safely"):
        read_state_dict(tmp_path / "unsafe.pt")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "none.safetensors")):
        read_state_dict(tmp_path / "none.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown suffix '.npz'"):
        read_state_dict(tmp_path / "weights.npz")
