"""Checkpoints are atomic, pruned, and restore model, optimizer, RNG and our state exactly."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from memetrain.engine.checkpoint import Checkpointer


def test_save_prune_and_restore(tmp_path):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2, accelerator=accelerator)
    for step in (1, 2, 3):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        checkpointer.save(step, {"step": step}, "seed: 0\n")
    assert [p.name for p in checkpointer.complete()] == ["step_0000002", "step_0000003"]
    assert not list((tmp_path / "checkpoints").glob(".*"))
    assert (checkpointer.latest() / "config.yaml").read_text() == "seed: 0\n"

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    after_save = torch.rand(3)
    with torch.no_grad():
        model.weight.add_(1.0)
    state = checkpointer.load(checkpointer.latest())
    assert state == {"step": 3}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.rand(3), after_save)  # the RNG is back where it was at the save


def test_an_unfinished_checkpoint_is_never_the_latest(tmp_path):
    accelerator = Accelerator(cpu=True)
    checkpointer = Checkpointer(tmp_path, keep=3, accelerator=accelerator)
    (tmp_path / "step_0000004").mkdir()
    (tmp_path / ".step_0000008.tmp").mkdir()  # what a kill during a save leaves
    assert checkpointer.latest().name == "step_0000004"
