"""The optimizer step in-process: accumulation equals a big batch, non-finite steps are skipped
and counted, and too many in a row stop the run with a clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState

from memetrain.data.manifest import Manifest
from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.tokenizer import TextEncoder
from memetrain.data.transforms import Resize
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.logger import RunLogger
from memetrain.engine.optim import build_adamw
from memetrain.engine.trainer import Trainer, TrainerSettings, TrainingError
from memetrain.methods import DataInfo
from memetrain.methods.supervised import Supervised

TEXT_ONLY = {
    "text": {"kind": "lstm", "vocab_size": None, "embed_dim": 16, "hidden_size": 16},
    "head": {"kind": "linear"},
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def settings(**overrides) -> TrainerSettings:
    values = dict(
        max_steps=4, global_batch_size=16, lr=1e-2, min_lr=1e-2, warmup_steps=0, weight_decay=0.0,
        weight_decay_end=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=None, precision="no", log_every=100,
        val_every=100,
        checkpoint_every=100, keep_checkpoints=1, max_nonfinite_steps=2,
    )  # fmt: skip
    return TrainerSettings(**{**values, **overrides})


def build(
    shards: Path,
    tmp_path: Path,
    batch_size: int,
    accumulation: int,
    method_cls=Supervised,
    precision="no",
    **trainer,
):
    torch.manual_seed(0)
    manifest = Manifest.load(shards)
    encoder = TextEncoder(shards / "tokenizer.json", 16)
    info = DataInfo(manifest.label_names, manifest.main_label, encoder.vocab_size, encoder.pad_id)
    method = method_cls(model=TEXT_ONLY, data=info)
    stream_settings = StreamSettings(batch_size=batch_size, num_workers=0, shuffle=False, drop_last=True)
    stream = MemeStream(shards, "train", stream_settings, Resize(8), encoder)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=precision)
    optimizer = build_adamw(method.param_groups(0.0), 1e-2, (0.9, 0.999), 1e-8, accelerator.device)
    model, optimizer = accelerator.prepare(method, optimizer)
    checkpointer = Checkpointer(tmp_path / "checkpoints", 1, accelerator)
    return Trainer(
        settings(precision=precision, **trainer),
        accelerator,
        model,
        optimizer,
        stream,
        checkpointer,
        "x: 1\n",
    )


def fit(trainer: Trainer, tmp_path: Path):
    return trainer.fit(lambda step: RunLogger(tmp_path, True, step))


def test_accumulated_micro_batches_equal_one_big_batch(synth_shards, tmp_path):
    big = build(synth_shards, tmp_path / "big", batch_size=16, accumulation=1)
    fit(big, tmp_path / "big")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    small = build(synth_shards, tmp_path / "small", batch_size=8, accumulation=2)
    fit(small, tmp_path / "small")
    for (name, a), (_, b) in zip(big.method.named_parameters(), small.method.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)  # summation order differs


class NonFiniteAt(Supervised):
    """Supervised, with the loss replaced by NaN (or inf) on chosen training-step calls."""

    bad_calls: set[int] = set()

    def training_step(self, batch):
        self.calls = getattr(self, "calls", -1) + 1
        losses, report = super().training_step(batch)
        if self.calls in self.bad_calls:
            losses = {"cls_loss": losses["cls_loss"] * (math.nan if self.calls % 2 else math.inf)}
        return losses, report


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights_alone(synth_shards, tmp_path):
    NonFiniteAt.bad_calls = {1, 2}
    trainer = build(synth_shards, tmp_path, batch_size=16, accumulation=1, method_cls=NonFiniteAt)
    before = {}

    original = trainer.train_step

    def spy(batches, window):
        if trainer.state.step == 1:
            before.update({k: v.clone() for k, v in trainer.method.state_dict().items()})
        original(batches, window)
        if trainer.state.step == 3:
            after = trainer.method.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"

    trainer.train_step = spy
    state = fit(trainer, tmp_path)
    assert state.step == 4 and state.skipped_steps == 2 and state.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in trainer.method.parameters())


def test_too_many_non_finite_steps_in_a_row_stop_the_run(synth_shards, tmp_path):
    NonFiniteAt.bad_calls = {0, 1, 2, 3}
    trainer = build(synth_shards, tmp_path, batch_size=16, accumulation=1, method_cls=NonFiniteAt)
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        fit(trainer, tmp_path)


def test_bf16_autocast_trains_on_cpu(synth_shards, tmp_path):
    trainer = build(synth_shards, tmp_path, batch_size=16, accumulation=1, precision="bf16")
    state = fit(trainer, tmp_path)
    assert state.step == 4 and state.skipped_steps == 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.method.parameters())
