"""TorchScript archives read as tensors only: the same tensors torch.jit.load gives (for an archive
the test wrote itself), and an archive whose pickle names any other global is refused unrun."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

from memetrain.errors import ConfigError
from memetrain.models.open_clip_weights import read_state
from memetrain.models.torchscript import TorchScriptError, is_torchscript, read_torchscript_state_dict


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.scale = nn.Parameter(torch.full((2,), 0.5, dtype=torch.half))
        self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x):
        x = self.norm(self.proj(x))
        for block in self.blocks:
            x = block(x)
        return x * self.scale.float().sum()


@pytest.fixture
def archive(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Tower().eval(), torch.randn(5, 3))
    traced.save(str(tmp_path / "tower.pt"))
    return tmp_path / "tower.pt"


def test_the_tensors_are_those_torch_jit_load_gives(archive):
    reference = torch.jit.load(str(archive)).state_dict()  # our own file: safe to run here
    state = read_torchscript_state_dict(archive)
    assert state.keys() == reference.keys()
    assert {"scale", "input_resolution", "blocks.1.weight", "norm.running_var"} <= state.keys()
    for name, value in reference.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert is_torchscript(archive)


def test_a_plain_torch_save_file_is_not_torchscript(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt")
    assert not is_torchscript(tmp_path / "state.pt")
    with pytest.raises(TorchScriptError, match="not a TorchScript archive"):
        read_torchscript_state_dict(tmp_path / "state.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def with_data_pickle(archive, target, data: bytes):
    """A copy of ``archive`` whose data.pkl is ``data``."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for info in source.infolist():
            content = data if info.filename.endswith("/data.pkl") else source.read(info.filename)
            copy.writestr(info, content)
    return target


def test_an_archive_naming_any_other_global_is_refused_and_never_run(archive, tmp_path):
    marker = tmp_path / "pickle-ran"
    evil = with_data_pickle(archive, tmp_path / "evil.pt", pickle.dumps(_Payload(marker), protocol=2))
    assert is_torchscript(evil)
    with pytest.raises(TorchScriptError, match="refused to load the global posix.system"):
        read_torchscript_state_dict(evil)
    with pytest.raises(ConfigError, match="evil.pt cannot be loaded into ViT-B-32, it cannot be read safely"):
        read_state(evil, "ViT-B-32")
    assert not marker.exists()


def test_an_archive_without_tensors_is_refused(archive, tmp_path):
    empty = with_data_pickle(archive, tmp_path / "empty.pt", pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(TorchScriptError, match="holds no tensors"):
        read_torchscript_state_dict(empty)
