"""GPU paths in one process on CPU: which batch norms become synchronised, what the trainer refuses
where it cannot honour an option, and fp16 steps the loss scaler skips (with torch's CPU
GradScaler). What needs processes is in test_gpu_paths_distributed.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from memetrain.cli import CONFIG_DIR
from memetrain.data.manifest import Manifest
from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.tokenizer import TextEncoder
from memetrain.data.transforms import Resize
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.distributed import running_statistics, training_autocast
from memetrain.engine.model_options import apply_trainer_options
from memetrain.engine.trainer import Trainer, TrainingError
from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, build_method
from memetrain.methods.base import Method
from memetrain.methods.supervised import Supervised
from tests.engine.test_trainer_steps import TEXT_ONLY, fit, settings
from tests.faults.faulty_methods import _InfiniteGradient

IMAGE = DataInfo(["hateful"], "hateful", vocab_size=None)
DINO = dict(
    out_dim=32, hidden_dim=16, bottleneck_dim=8, use_bn_in_head=True, norm_last_layer=True,
    student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, teacher_temp_warmup_steps=10,
    center_momentum=0.9, teacher_momentum=0.996, teacher_momentum_end=1.0, freeze_last_layer_steps=1,
)  # fmt: skip
SUPERVISED_BN = {"image": {"name": "test_resnet", "image_size": 32}, "head": {"kind": "linear"}}


def trainer(name: str = "single", *overrides: str) -> dict:
    """The trainer group as a run composes it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"trainer={name}", *overrides])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def dino():
    torch.manual_seed(0)
    return build_method("dino", DINO, {"image": {"name": "test_resnet", "image_size": 32}}, IMAGE)


def supervised():
    torch.manual_seed(0)
    return build_method("supervised", {}, SUPERVISED_BN, IMAGE)


def batch_norms(module: nn.Module) -> list[type]:
    return [type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# -- trainer.sync_batchnorm --------------------------------------------------------------------------


def test_auto_synchronises_dino_s_student_and_teacher_on_gpus():
    """As DINO's main_dino.py: every batch norm of both networks, the backbone's and the head's;
    the parameters and buffers stay the same tensors under the same names (checkpoints load)."""
    method = dino()
    before = dict(method.state_dict(keep_vars=True))
    apply_trainer_options(method, trainer("ddp"), 1, processes=2, cuda=True)
    for network in (method.student, method.teacher):
        assert batch_norms(network["backbone"]) and set(batch_norms(network)) == {nn.SyncBatchNorm}
    assert len(batch_norms(method.student["head"])) == 2  # use_bn_in_head
    after = method.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_auto_leaves_methods_that_do_not_ask_and_true_converts_them():
    method = supervised()
    apply_trainer_options(method, trainer("ddp"), 1, processes=2, cuda=True)
    assert nn.SyncBatchNorm not in batch_norms(method)
    apply_trainer_options(method, trainer("ddp", "trainer.sync_batchnorm=true"), 1, processes=2, cuda=True)
    assert set(batch_norms(method)) == {nn.SyncBatchNorm}


def test_one_process_or_false_keeps_plain_batch_norm():
    for processes, option in ((1, "true"), (2, "false")):
        method = dino()
        options = trainer("single", f"trainer.sync_batchnorm={option}")
        apply_trainer_options(method, options, 1, processes=processes, cuda=True)
        assert nn.SyncBatchNorm not in batch_norms(method)


def test_on_cpu_auto_keeps_each_rank_s_statistics_and_true_is_refused(caplog):
    """torch's SyncBatchNorm computes its statistics with CUDA kernels only (the 2-rank gloo test in
    test_gpu_paths_distributed.py shows it refusing CPU input)."""
    method = dino()
    with caplog.at_level(logging.INFO, logger="memetrain.engine.model_options"):
        apply_trainer_options(method, trainer("ddp"), 1, processes=2, cuda=False)
    assert nn.SyncBatchNorm not in batch_norms(method)
    assert "normalises over each process's own batch on CPU" in caplog.text
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm=true needs GPUs"):
        apply_trainer_options(
            dino(), trainer("ddp", "trainer.sync_batchnorm=true"), 1, processes=2, cuda=False
        )
    with pytest.raises(ConfigError, match="choose auto, true or false"):
        apply_trainer_options(dino(), trainer("ddp", "trainer.sync_batchnorm=yes"), 1, processes=2, cuda=True)


# -- fp16 steps the loss scaler skips ----------------------------------------------------------------
#
# Accelerate builds a GradScaler only on CUDA. On CPU the test gives the Accelerator what it has on a
# GPU with mixed_precision=fp16: torch's CPU GradScaler (torch.amp.GradScaler("cpu"), the same class)
# and native AMP, so its forward runs under fp16 autocast. A scale of 2^40 makes the fp16 backward of
# the first step overflow for real (the scaler skips it and drops to 1, through backoff_factor), and
# the later steps fit.


class AfterSteps(Supervised):
    """Supervised, recording the steps its after_step ran for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.after_steps: list[int] = []

    def after_step(self, step, total_steps):
        self.after_steps.append(step)


class InfiniteGradient(AfterSteps):
    """A finite loss whose gradient is infinite at every step (what no loss scale can fix)."""

    def training_step(self, batch):
        losses, report = super().training_step(batch)
        return {"cls_loss": _InfiniteGradient.apply(losses["cls_loss"])}, report


def fp16_trainer(
    shards: Path, tmp_path: Path, fused: bool, init_scale: float, method_cls=AfterSteps
) -> Trainer:
    torch.manual_seed(0)
    manifest = Manifest.load(shards)
    encoder = TextEncoder(shards / "tokenizer.json", 16)
    info = DataInfo(manifest.label_names, manifest.main_label, encoder.vocab_size, encoder.pad_id)
    method = method_cls(model=TEXT_ONLY, data=info)
    stream = MemeStream(
        shards,
        "train",
        StreamSettings(batch_size=16, num_workers=0, shuffle=False, drop_last=True),
        Resize(8),
        encoder,
    )
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True  # as on a GPU: autocast in fp16 and the scaler's unscale before clipping
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=1 / init_scale)
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2, fused=fused)
    model, optimizer = accelerator.prepare(method, optimizer)
    checkpointer = Checkpointer(tmp_path / "checkpoints", 1, accelerator)
    return Trainer(settings(precision="fp16"), accelerator, model, optimizer, stream, checkpointer, "x: 1\n")


@pytest.mark.parametrize("fused", [True, False], ids=["fused AdamW", "foreach AdamW"])
def test_an_overflowed_fp16_step_is_counted_and_skips_after_step(synth_shards, tmp_path, fused):
    """Fused AdamW (the default on CUDA) takes the scaler's verdict inside its kernel: Accelerate's
    optimizer.step_was_skipped then never says True, so the scale it lowered is what tells."""
    trainer = fp16_trainer(synth_shards, tmp_path, fused, init_scale=2.0**40)
    weights = {}
    original = trainer.train_step

    def spy(batches, window):
        weights[trainer.state.step] = {k: v.clone() for k, v in trainer.method.state_dict().items()}
        original(batches, window)

    trainer.train_step = spy
    state = fit(trainer, tmp_path)
    assert trainer.accelerator.scaler.get_scale() == 1.0, "the first step did not overflow"
    assert state.step == 4 and state.skipped_steps == 1 and state.consecutive_nonfinite == 0
    assert trainer.method.after_steps == [1, 2, 3], "after_step ran for the skipped step"
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the skipped step moved"
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])


def test_a_gradient_that_overflows_at_scale_1_is_non_finite_and_stops_the_run(synth_shards, tmp_path):
    trainer = fp16_trainer(synth_shards, tmp_path, True, init_scale=2.0, method_cls=InfiniteGradient)
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):  # max_nonfinite_steps=2
        fit(trainer, tmp_path)
    assert (
        trainer.state.skipped_steps == 4 and trainer.method.after_steps == []
    )  # 2 -> 1: an overflow, then 3


# -- the buffers ranks keep equal ----------------------------------------------------------------------


def test_running_statistics_are_the_persistent_per_rank_ones():
    """BatchNorm's and a tracking InstanceNorm's mean, variance and count; not a SyncBatchNorm's
    (equal on every rank), a non-tracking norm's, the image normaliser's constants, DINO's center
    (all-reduced by its loss) or LayerNorm."""
    method = dino()
    tracking = nn.InstanceNorm2d(3, track_running_stats=True)
    extra = nn.ModuleList(
        [nn.BatchNorm1d(4), nn.SyncBatchNorm(5), tracking, nn.InstanceNorm2d(3), nn.LayerNorm(3)]
    )
    method.extra = extra
    found = {id(t) for t in running_statistics(method)}
    expected = [extra[0].running_mean, extra[0].running_var, extra[0].num_batches_tracked]
    expected += [tracking.running_mean, tracking.running_var, tracking.num_batches_tracked]
    assert {id(t) for t in expected} <= found
    assert not {id(t) for t in (*extra[1].buffers(), method.loss.center)} & found
    normalize = method.student["backbone"].normalize
    assert not {id(normalize.scale), id(normalize.shift)} & found
    norms = [m for m in method.modules() if type(m) is nn.BatchNorm2d or type(m) is nn.BatchNorm1d]
    assert len(found) == 3 * len(norms) + 3  # every plain batch norm's three, the tracking InstanceNorm's


# -- evaluation: the encoders once per batch ---------------------------------------------------------


@pytest.fixture
def clip_file(tmp_path):
    """Weights of the small CLIP the frozen-CLIP methods' tests use."""
    from tests.methods.test_clip import clip

    torch.manual_seed(0)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip(embed_dim=16).state_dict().items()}, str(path))
    return path


def classifiers(weights: Path) -> dict:
    from tests.methods import test_clip, test_cmml, test_mmbt, test_semimemes, test_tib_va

    supervised_model = {
        "image": {"name": "test_resnet"},
        "text": {
            "kind": "transformer",
            "vocab_size": None,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
        },
        "head": {"kind": "concat", "hidden_dim": 16},
    }
    return {
        "supervised": lambda: build_method("supervised", {}, supervised_model, test_clip.DATA),
        "mmbt": test_mmbt.mmbt,
        "tib_va": lambda: test_tib_va.tib_va(weights),
        "cmml": lambda: test_cmml.cmml(weights),
        "semimemes": lambda: test_semimemes.semimemes(weights),
    }


@pytest.mark.parametrize("name", ["supervised", "mmbt", "tib_va", "cmml", "semimemes"])
def test_embed_and_predict_gives_embed_and_predict_with_one_pass_of_the_encoders(clip_file, name):
    from tests.methods.test_clip import meme_batch

    torch.manual_seed(0)
    method = classifiers(clip_file)[name]().eval()
    batch = meme_batch()
    calls = []
    with torch.no_grad(), nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m)):
        features, logits = method.embed_and_predict(batch)
        together, calls[:] = len(calls), []
        expected = (method.embed(batch), method.predict(batch))
    assert type(method).embed_and_predict is not Method.embed_and_predict
    torch.testing.assert_close(features, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(logits, expected[1], rtol=0, atol=0)
    assert together < len(calls), f"{together} module calls together, {len(calls)} apart"


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_training_autocast_without_deepspeed_is_accelerate_s(precision, dtype):
    """Under DeepSpeed it is the engine's autocast (test_gpu_paths_distributed.py)."""
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    with training_autocast(accelerator):
        assert nn.Linear(2, 2)(torch.randn(1, 2)).dtype == dtype
