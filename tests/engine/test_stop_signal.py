"""SIGTERM / SIGUSR2 during training: the trainer finishes the step, checkpoints, raises
TrainingStopped, and resuming from that checkpoint ends with the weights of an unstopped run."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from memetrain.errors import TrainingStopped
from memetrain.methods.supervised import Supervised
from tests.engine.test_trainer_steps import build, fit
from tests.helpers import reset_accelerate

STEPS = 6


class SignalledAt(Supervised):
    """Sends itself ``signum`` at the start of optimizer step ``at`` (a signal from outside)."""

    at, signum = 2, signal.SIGUSR2

    def before_step(self, step: int, total_steps: int) -> None:
        super().before_step(step, total_steps)
        if step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_resuming_matches_an_unstopped_run(synth_shards, tmp_path, signum):
    SignalledAt.signum = signum
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    stopped = build(synth_shards, tmp_path / "stopped", 16, 1, SignalledAt, max_steps=STEPS)
    with pytest.raises(TrainingStopped, match=f"stopped by {signal.Signals(signum).name} at step 3") as info:
        fit(stopped, tmp_path / "stopped")
    assert info.value.checkpoint.endswith("step_0000003")
    assert [p.name for p in stopped.checkpointer.complete()] == ["step_0000003"]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, "the default handlers are back"

    reset_accelerate()
    resumed = build(synth_shards, tmp_path / "stopped", 16, 1, max_steps=STEPS)
    assert fit(resumed, tmp_path / "stopped").step == STEPS
    reset_accelerate()
    straight = build(synth_shards, tmp_path / "straight", 16, 1, max_steps=STEPS)
    fit(straight, tmp_path / "straight")
    ours, theirs = resumed.method.state_dict(), straight.method.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
