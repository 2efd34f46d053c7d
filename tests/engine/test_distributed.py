"""Distributed setup in one process: Slurm's variables mapped to torch's, trainer configs and the
checks that refuse what cannot run, the DeepSpeed config built from a trainer config, and the
model switches (gradient checkpointing, channels-last, DeepSpeed's 0-d parameter workaround)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from memetrain.cli import CONFIG_DIR
from memetrain.engine.distributed import check_trainer, env_from_slurm, first_host, tasks_per_node
from memetrain.engine.model_options import apply_trainer_options
from memetrain.engine.optim import build_optimizer
from memetrain.engine.zero import deepspeed_config, vectorize_scalar_parameters
from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, Method
from memetrain.methods.base import Stage
from memetrain.methods.supervised import Supervised
from memetrain.models.image import ImageNormalizer
from memetrain.models.memory import enable_gradient_checkpointing, use_channels_last

TRAINERS = ("single", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")
DATA = DataInfo(label_names=["label"], main_label="label", vocab_size=30)
BERT = {"kind": "transformer", "vocab_size": None, "hidden_size": 16, "num_layers": 1, "num_heads": 2}


def trainer(name: str = "single", *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"trainer={name}", *overrides])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


# -- Slurm ----------------------------------------------------------------------------------------

SRUN_TASK = {  # task 5 of `srun --nodes 2 --ntasks-per-node 4` in job 123456, as srun sets it
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


def test_an_srun_task_gets_torch_rank_world_size_and_master_from_slurm():
    environ = dict(SRUN_TASK)
    mapped = env_from_slurm(environ)
    assert mapped == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert {key: environ[key] for key in mapped} == mapped


def test_a_launcher_s_variables_and_a_set_master_are_kept():
    under_torchrun = {**SRUN_TASK, "RANK": "0", "WORLD_SIZE": "4"}
    assert env_from_slurm(under_torchrun) == {} and under_torchrun["WORLD_SIZE"] == "4"
    environ = {**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"}
    mapped = env_from_slurm(environ)
    assert mapped["MASTER_ADDR"] == "10.0.0.7" and mapped["MASTER_PORT"] == "29400"


def test_a_batch_script_outside_srun_stays_one_process():
    batch_step = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP_")}
    batch_step["SLURM_PROCID"] = "0"
    assert env_from_slurm(batch_step) == {} and "RANK" not in batch_step


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node7", "node7"), ("gpu[003-010,12],cpu1", "gpu003"), ("a-b[1,3]", "a-b1"), ("h-1,h-2", "h-1")],
)
def test_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_tasks_per_node_expands_slurm_counts():
    assert tasks_per_node("4(x2),3") == [4, 4, 3] and tasks_per_node("2") == [2]


# -- trainer configs and their checks --------------------------------------------------------------


def test_every_trainer_config_composes_with_the_same_fields():
    single = trainer("single")
    for name in TRAINERS:
        cfg = trainer(name)
        assert cfg.keys() == single.keys(), name
        assert cfg["strategy"] == {"single": "single", "ddp": "ddp"}.get(name, "deepspeed")
        if name.startswith("deepspeed"):
            assert cfg["deepspeed"]["zero_stage"] == int(name[-1])


@pytest.mark.parametrize(
    ("name", "overrides", "processes", "message"),
    [
        ("ddp", [], 1, "trainer=ddp but this is one process"),
        ("single", ["trainer.precision=fp16"], 1, "fp16 needs a GPU"),
        ("single", ["trainer.compile=true"], 1, "trainer.compile=true is a GPU option"),
        ("single", ["trainer.tf32=true"], 2, "trainer.tf32=true is a GPU option"),
        ("single", ["trainer.channels_last=true"], 1, "trainer.channels_last=true is a GPU option"),
        ("single", ["trainer.strategy=fsdp"], 1, "trainer.strategy='fsdp'"),
        ("deepspeed_zero2", ["trainer.deepspeed.offload_params=cpu"], 2, "offload_params needs ZeRO-3"),
        (
            "deepspeed_zero3",
            ["trainer.deepspeed.offload_params=nvme"],
            2,
            "needs trainer.deepspeed.nvme_path",
        ),
        ("deepspeed_zero2", ["trainer.deepspeed.optimizer=fused_adam"], 2, "fused_adam is a CUDA kernel"),
        ("deepspeed_zero2", ["trainer.deepspeed.zero_stage=4"], 2, "zero_stage=4"),
    ],
)
def test_settings_that_cannot_run_here_are_refused_by_name(name, overrides, processes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trainer(trainer(name, *overrides), processes, cuda=False)


def test_an_accelerate_deepspeed_launch_must_agree_with_the_trainer(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="launches DeepSpeed but trainer.strategy=ddp"):
        check_trainer(trainer("ddp"), 2, cuda=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match="ZeRO stage 2 but trainer.deepspeed.zero_stage=3"):
        check_trainer(trainer("deepspeed_zero3"), 2, cuda=False)
    check_trainer(trainer("deepspeed_zero2"), 2, cuda=False)


def test_the_gpu_options_pass_the_checks_on_a_gpu():
    options = [
        "trainer.compile=true",
        "trainer.tf32=true",
        "trainer.channels_last=true",
        "trainer.precision=fp16",
    ]
    check_trainer(
        trainer("deepspeed_zero3", *options, "trainer.deepspeed.optimizer=fused_adam"), 8, cuda=True
    )


# -- the DeepSpeed config ---------------------------------------------------------------------------


def test_deepspeed_config_keeps_our_global_batch_clipping_and_offload():
    t = trainer(
        "deepspeed_zero3",
        "trainer.precision=bf16",
        "trainer.grad_clip=0.5",
        "trainer.deepspeed.offload_optimizer=cpu",
        "trainer.deepspeed.offload_params=cpu",
        "trainer.deepspeed.param_persistence_threshold=1000",
    )
    config = deepspeed_config(t, batch_size=8, accumulation=2, processes=4)
    assert config["train_batch_size"] == 64 == 8 * 2 * 4
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 1000
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]


def test_deepspeed_fp16_is_its_own_with_dynamic_loss_scaling_and_no_clip_means_zero():
    config = deepspeed_config(
        trainer("deepspeed_zero1", "trainer.precision=fp16", "trainer.grad_clip=null"), 4, 1, 2
    )
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0
    assert "torch_autocast" not in config and config["gradient_clipping"] == 0.0
    assert "offload_optimizer" not in config["zero_optimization"]


def test_scalar_parameters_become_one_element_vectors_with_the_same_value():
    class Towers(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    module = nn.Sequential(Towers())
    module[0].logit_scale.requires_grad_(False)
    assert vectorize_scalar_parameters(module) == ["0.logit_scale"]
    scale = module[0].logit_scale
    assert scale.shape == (1,) and not scale.requires_grad and scale.item() == pytest.approx(math.log(10.0))
    assert dict(module.named_parameters()).keys() == {"0.proj.weight", "0.proj.bias", "0.logit_scale"}


def test_the_torch_optimizer_is_adamw_with_our_hyperparameters():
    optimizer = build_optimizer([{"params": [nn.Parameter(torch.zeros(2))]}], trainer(), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == trainer()["lr"]


# -- model switches ---------------------------------------------------------------------------------


def test_gradient_checkpointing_reaches_every_backbone_and_names_the_lstm():
    fusion = {"image": {"name": "test_vit", "image_size": 32}, "text": BERT, "head": {"kind": "concat"}}
    method = Supervised(model=fusion, data=DATA)
    enabled, unsupported = enable_gradient_checkpointing(method)
    assert enabled == ["model.image_encoder.model", "model.text_encoder.model"] and unsupported == []
    assert method.model.image_encoder.model.grad_checkpointing
    assert method.model.text_encoder.model.is_activation_checkpointing

    lstm = {
        "text": {"kind": "lstm", "vocab_size": None, "embed_dim": 8, "hidden_size": 8},
        "head": {"kind": "linear"},
    }
    assert enable_gradient_checkpointing(Supervised(model=lstm, data=DATA)) == (
        [],
        ["model.text_encoder.lstm"],
    )


def test_channels_last_converts_convolutions_and_the_normalised_images():
    image_only = {"image": {"name": "test_resnet"}, "head": {"kind": "linear"}}
    method = Supervised(model=image_only, data=DATA)
    use_channels_last(method)
    conv = next(m for m in method.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    normalizer = next(m for m in method.modules() if isinstance(m, ImageNormalizer))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert normalizer(images).is_contiguous(memory_format=torch.channels_last)
    lstm = {
        "text": {"kind": "lstm", "vocab_size": None, "embed_dim": 8, "hidden_size": 8},
        "head": {"kind": "linear"},
    }
    with pytest.raises(ConfigError, match="no image encoder"):
        use_channels_last(Supervised(model=lstm, data=DATA))


class _Tiny(Method):
    name = "tiny"

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch):
        return {"loss": self.layer(batch).sum()}, {}

    def embed(self, batch):
        return batch


class _TwoStages(_Tiny):
    name = "two_stages"

    def stages(self, max_steps):
        return [Stage("a", 1, False), Stage("b", max_steps, True)]


class _WithEma(_Tiny):
    name = "with_ema"

    def after_step(self, step, total_steps):
        pass


def test_zero3_refuses_two_stages_and_weights_changed_after_the_step():
    zero3 = trainer("deepspeed_zero3")
    with pytest.raises(ConfigError, match="trains in 2 stages"):
        apply_trainer_options(_TwoStages(), zero3, 2)
    with pytest.raises(ConfigError, match="changes weights after each optimizer step"):
        apply_trainer_options(_WithEma(), zero3, 1)
    assert apply_trainer_options(_TwoStages(), trainer("deepspeed_zero2"), 2) == []
    assert apply_trainer_options(_WithEma(), trainer("ddp"), 1) == []


def test_shipped_accelerate_configs_launch_processes_not_settings():
    for path in sorted((Path(CONFIG_DIR) / "accelerate").glob("*.yaml")):
        config = OmegaConf.load(path)
        assert config.mixed_precision == "no", path.name  # trainer.precision decides
        assert config.distributed_type in ("MULTI_GPU", "DEEPSPEED"), path.name
