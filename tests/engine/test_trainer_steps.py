"""The optimizer step in-process: accumulation equals a big batch, non-finite steps are skipped
and counted, and too many in a row stop the run with a clear error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

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
from tests.helpers import reset_accelerate

TEXT_ONLY = {
    "text": {"kind": "lstm", "vocab_size": None, "embed_dim": 16, "hidden_size": 16},
    "head": {"kind": "linear"},
}


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
    optimizer=None,
    validation=None,
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
    groups = method.param_groups(0.0)
    optimizer = (
        optimizer(groups) if optimizer else build_adamw(groups, 1e-2, (0.9, 0.999), 1e-8, accelerator.device)
    )
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
        validation,
    )


def fit(trainer: Trainer, tmp_path: Path):
    return trainer.fit(lambda step: RunLogger(tmp_path, True, step))


def test_accumulated_micro_batches_equal_one_big_batch(synth_shards, tmp_path):
    big = build(synth_shards, tmp_path / "big", batch_size=16, accumulation=1)
    fit(big, tmp_path / "big")
    reset_accelerate()
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
    weights = {}  # after each step
    original = trainer.train_step

    def spy(batches, window):
        original(batches, window)
        weights[trainer.state.step] = {k: v.clone() for k, v in trainer.method.state_dict().items()}

    trainer.train_step = spy
    state = fit(trainer, tmp_path)
    assert sorted(weights) == [1, 2, 3, 4], "the spy did not see every step"
    assert all(torch.equal(weights[1][k], weights[3][k]) for k in weights[1]), (
        "a skipped step changed the weights"
    )
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3]), (
        "the step after them did not train"
    )
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
