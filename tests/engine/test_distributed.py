"""Distributed setup in one process: Slurm's variables mapped to torch's (the one mapping, as train.py,
a submitit job and the sbatch template use it), trainer configs and the checks that refuse what
cannot run, the DeepSpeed config built from a trainer config, and the model switches (gradient
checkpointing, channels-last, DeepSpeed's 0-d parameter workaround)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from memetrain.cli import CONFIG_DIR
from memetrain.engine import distributed
from memetrain.engine.distributed import (
    build_accelerator,
    check_trainer,
    enable_determinism,
    gpu_request,
    no_cuda_message,
)
from memetrain.engine.model_options import apply_trainer_options
from memetrain.engine.optim import build_optimizer
from memetrain.engine.zero import deepspeed_config, vectorize_scalar_parameters
from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, Method
from memetrain.methods.base import Stage
from memetrain.methods.supervised import Supervised
from memetrain.models.image import ImageNormalizer
from memetrain.models.memory import enable_gradient_checkpointing, use_channels_last
from memetrain.slurm_env import env_from_slurm, first_host, single_device_env, tasks_per_node, torch_env
from memetrain.sweep import job
from tests.helpers import REPO

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


@pytest.mark.parametrize(
    ("visible", "local_rank"),
    [
        ("3", "0"),  # srun --gpus-per-task 1: task 1 sees only its own GPU, as device 0
        ("GPU-5f1c2d3e", "0"),
        ("0,1,2,3", "1"),  # --gpus-per-node: every task sees the node's GPUs, LOCAL_RANK picks one
        (None, "1"),
        ("", "1"),  # no GPU at all: nothing to pick
        ("NoDevFiles", "1"),
    ],
)
def test_a_task_that_sees_one_gpu_gets_local_rank_0(visible, local_rank):
    task = SRUN_TASK if visible is None else {**SRUN_TASK, "CUDA_VISIBLE_DEVICES": visible}
    mapped = torch_env(task)
    assert mapped["LOCAL_RANK"] == local_rank and mapped["RANK"] == "5" and mapped["LOCAL_WORLD_SIZE"] == "4"


def test_torch_s_device_count_of_one_maps_local_rank_to_device_0():
    """A site that binds GPUs by cgroup leaves CUDA_VISIBLE_DEVICES unset: build_accelerator passes
    torch's count. A task that is local rank 0 already, or sees several devices, keeps its rank."""
    assert single_device_env({"LOCAL_RANK": "3"}, device_count=1) == {"LOCAL_RANK": "0"}
    assert single_device_env({"LOCAL_RANK": "3"}, device_count=4) == {}
    assert single_device_env({"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "2"}, device_count=1) == {}
    assert single_device_env({}, device_count=1) == {}


def test_train_py_maps_slurm_s_variables_through_the_one_mapping():
    assert distributed.env_from_slurm is env_from_slurm  # what run.py calls before the Accelerator


def test_a_submitit_task_gets_the_same_mapping_and_agrees_with_submitit(monkeypatch, tmp_path):
    """Each training process of a submitit task gets torch's variables from the same function
    train.py uses under srun; submitit's own reading of the task's variables is the reference."""
    import submitit

    submitit_task = {**SRUN_TASK, "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path)}
    submitit_task |= {"SLURM_JOB_NUM_NODES": "2", "SLURM_ARRAY_JOB_ID": "123450", "SLURM_ARRAY_TASK_ID": "6"}
    for name in [n for n in os.environ if n.startswith(("SLURM_", "SUBMITIT_"))] + ["RANK", "MASTER_PORT"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in submitit_task.items():
        monkeypatch.setenv(name, value)
    mapped = job._distributed_env()
    assert mapped == torch_env(submitit_task) and mapped["MASTER_PORT"] == str(20000 + 123456 % 20000)
    theirs = submitit.JobEnvironment()
    assert (mapped["RANK"], mapped["WORLD_SIZE"], mapped["LOCAL_RANK"]) == tuple(
        str(n) for n in (theirs.global_rank, theirs.num_tasks, theirs.local_rank)
    )
    assert mapped["MASTER_ADDR"] == theirs.hostnames[0] == "gpu003"
    assert mapped["LOCAL_WORLD_SIZE"] == str(theirs.num_tasks // theirs.num_nodes)


def test_a_submitit_job_outside_srun_and_a_launcher_s_ranks_get_nothing(monkeypatch):
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    assert job._distributed_env() == {}
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # the batch step of an allocation: no srun step
    assert job._distributed_env() == {}


def test_the_mapping_imports_no_torch_and_prints_shell_exports():
    """The submitit process imports sweep/job.py beside a training: it must stay small. The module
    prints the mapping for a task as ``export`` lines (for scripts and for checking an allocation)."""
    code = "import sys, memetrain.sweep.job, memetrain.slurm_env; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "RANK"}
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stderr[-2000:]
    printed = subprocess.run(
        [sys.executable, "-m", "memetrain.slurm_env"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, **SRUN_TASK},
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout.splitlines() == [f"export {k}={v}" for k, v in torch_env(SRUN_TASK).items()]


def test_train_sbatch_lets_each_task_map_its_variables_and_passes_cpus_per_task(tmp_path):
    """slurm/train.sbatch run as Slurm would, with stand-ins for srun (it starts the command once,
    as task 0 of 2), scontrol and python (it records its environment and exits as told)."""
    bin_dir, seen = tmp_path / "bin", tmp_path / "seen"
    bin_dir.mkdir()
    stand_ins = {
        "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\n'
        'SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_NODELIST=node1 "$@"',
        "scontrol": f'echo "$@" > {tmp_path}/scontrol',
        "python": f'env > {seen}; echo "$@" > {tmp_path}/args; exit "$EXIT_CODE"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    allocation = {
        "SLURM_JOB_ID": "99",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": "8",
    }
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python"), **allocation}
    for code in (0, 75):
        done = subprocess.run(
            ["bash", str(REPO / "slurm" / "train.sbatch"), "trainer=ddp"],
            env={**base, "EXIT_CODE": str(code)}, cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == code, done.stderr
    environ = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert environ["SRUN_CPUS_PER_TASK"] == "8"
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & environ.keys()
    assert torch_env(environ) | {"MASTER_PORT": "-"} == {
        "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "NODE_RANK": "0", "MASTER_ADDR": "node1",
        "MASTER_PORT": "-",
    }  # fmt: skip
    assert (tmp_path / "args").read_text().split() == ["launcher/train.py", "trainer=ddp"]
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "99"], "exit 75 requeues the job"


# -- no silent CPU fallback -------------------------------------------------------------------------

ACCELERATE_GPU_LAUNCH = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "LOCAL_RANK": "1",
    "RANK": "1",
    "WORLD_SIZE": "8",
}


@pytest.mark.parametrize(
    ("environ", "request_"),
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_GPUS_ON_NODE=4"),
        ({"SLURM_STEP_GPUS": "2"}, "SLURM_STEP_GPUS=2"),
        ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        (ACCELERATE_GPU_LAUNCH, "an accelerate launch config for GPUs (ACCELERATE_USE_CPU unset)"),
        ({}, None),
        ({"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_GPUS": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({**ACCELERATE_GPU_LAUNCH, "ACCELERATE_USE_CPU": "1"}, None),  # configs/accelerate/cpu_2proc.yaml
        ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False"}, None),  # one process, no config
    ],
)
def test_what_asks_for_a_gpu(environ, request_):
    assert gpu_request(environ) == request_


def test_a_gpu_request_without_cuda_stops_before_any_process_group(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(distributed, "nvidia_driver", lambda: ("550.54.14", "12.4"))
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as refused:
        build_accelerator(trainer("ddp"), 8, 1)
    message = str(refused.value)
    assert "\n" not in message and not torch.distributed.is_initialized()
    assert message.startswith("SLURM_GPUS_ON_NODE=1 asks for a GPU but torch.cuda.is_available() is False: ")
    assert "built for CUDA 12.8, newer than the CUDA 12.4 that NVIDIA driver 550.54.14 runs" in message
    release = torch.__version__.split("+")[0]
    assert f"pip install torch=={release} --index-url https://download.pytorch.org/whl/cu124" in message
    assert message.endswith("or submit without GPUs (no --gpus, --gres=gpu) to train on the CPU")


@pytest.mark.parametrize(
    ("torch_cuda", "driver", "why", "wheel"),
    [
        (None, ("570.86.10", "12.8"), "torch 2.14.1+cpu is a CPU-only build", "/whl/cu128 "),
        ("13.0", None, "no NVIDIA driver answers here", "/whl/cuXYZ, XYZ from the 'CUDA Version'"),
        (
            "12.6",
            ("550.54.14", None),
            "NVIDIA driver 550.54.14 is loaded but nvidia-smi does not answer",
            "cuXYZ",
        ),
        (
            "12.6",
            ("570.86.10", "12.8"),
            "CUDA is unusable although NVIDIA driver 570.86.10 (CUDA 12.8)",
            "cu128",
        ),
        ("12.10", ("580.1", "12.9"), "built for CUDA 12.10, newer than the CUDA 12.9", "cu129"),
    ],
)
def test_the_no_cuda_line_says_why_and_which_wheel(torch_cuda, driver, why, wheel):
    message = no_cuda_message("CUDA_VISIBLE_DEVICES=0", "2.14.1+cpu", torch_cuda, driver)
    assert why in message and wheel in message and "pip install torch==2.14.1 --index-url" in message
    assert message.endswith("or unset CUDA_VISIBLE_DEVICES to train on the CPU")


def test_the_driver_and_its_cuda_version_are_read_from_nvidia_smi(monkeypatch, tmp_path):
    header = "| NVIDIA-SMI 550.54.14      Driver Version: 550.54.14      CUDA Version: 12.4     |"
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho '{header}'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert distributed.nvidia_driver() == ("550.54.14", "12.4")


def test_a_rendezvous_bound_that_is_not_positive_is_refused_by_name():
    for seconds in (0, -5.0):
        with pytest.raises(
            ConfigError, match=re.escape(f"trainer.rendezvous_timeout_s={seconds}: give the seconds")
        ):
            build_accelerator(trainer("ddp"), 8, 1, rendezvous_timeout_s=seconds)


# -- determinism ------------------------------------------------------------------------------------


@pytest.fixture
def nondeterministic_after():
    yield
    torch.use_deterministic_algorithms(False)


def test_determinism_fixes_cublas_s_workspace_unless_set_to_a_deterministic_one(nondeterministic_after):
    environ = {}
    enable_determinism(environ)
    assert environ == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} and torch.are_deterministic_algorithms_enabled()
    for value, kept in ((":16:8", ":16:8"), (":0:0", ":4096:8")):
        environ = {"CUBLAS_WORKSPACE_CONFIG": value}
        enable_determinism(environ)
        assert environ["CUBLAS_WORKSPACE_CONFIG"] == kept


def test_determinism_after_cuda_started_without_the_workspace_is_refused(monkeypatch, nondeterministic_after):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match="export CUBLAS_WORKSPACE_CONFIG=:4096:8 before launching"):
        enable_determinism({})
    enable_determinism({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})  # set by the user before CUDA started


def test_build_accelerator_makes_a_deterministic_trainer_deterministic():
    code = (
        "import json, os, sys, torch\n"
        "from memetrain.engine.distributed import build_accelerator\n"
        "build_accelerator(json.loads(sys.argv[1]), 8, 1)\n"
        "print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'), torch.are_deterministic_algorithms_enabled())\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES")
    }
    for value, printed in (("true", ":4096:8 True"), ("false", "None False")):
        options = json.dumps(trainer("single", f"trainer.deterministic={value}"))
        done = subprocess.run(
            [sys.executable, "-c", code, options], capture_output=True, text=True, cwd=REPO, env=env
        )
        assert done.returncode == 0 and done.stdout.splitlines()[-1] == printed, done.stderr[-3000:]


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
        ("single", ["trainer.cudnn_benchmark=true"], 1, "trainer.cudnn_benchmark=true is a GPU option"),
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


def test_an_accelerate_deepspeed_launch_s_offload_devices_must_agree(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "asks for offload_optimizer_device: cpu (ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE) but "
            "trainer.deepspeed.offload_optimizer=none: make them agree (trainer.deepspeed.offload_optimizer=cpu)"
        ),
    ):
        check_trainer(trainer("deepspeed_zero2"), 2, cuda=False)
    check_trainer(trainer("deepspeed_zero2", "trainer.deepspeed.offload_optimizer=cpu"), 2, cuda=False)


@pytest.mark.parametrize("strategy", ["single", "ddp", "deepspeed_zero2"])
def test_accelerate_launch_s_mixed_precision_must_agree_with_the_trainer(monkeypatch, strategy):
    """accelerate launch --mixed_precision bf16 arrives as ACCELERATE_MIXED_PRECISION; the Accelerator
    is built with trainer.precision, so a launcher that asks for another one is refused, not ignored."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError) as refused:
        check_trainer(trainer(strategy), 2, cuda=False)
    assert str(refused.value) == (
        "accelerate launch asks for mixed precision bf16 (--mixed_precision or mixed_precision in its config: "
        "ACCELERATE_MIXED_PRECISION=bf16) but trainer.precision=no: make them agree: add trainer.precision=bf16 "
        "(a precision memetrain trains in), or launch with --mixed_precision no"
    )
    check_trainer(trainer(strategy, "trainer.precision=bf16"), 2, cuda=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(
        ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8.*memetrain trains in no, bf16 or fp16"
    ):
        check_trainer(trainer(strategy), 2, cuda=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what Accelerate passes when none was asked for
    check_trainer(trainer(strategy, "trainer.precision=bf16"), 2, cuda=False)


# -- a DeepSpeed JSON of the user's ------------------------------------------------------------------

HF_STYLE = {  # as Hugging Face's examples write one: "auto" where the training script decides
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 12},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "wall_clock_breakdown": False,
}


def settings_with(config: dict, tmp_path, *overrides: str, batch: int = 8, accumulation: int = 2) -> dict:
    """The DeepSpeed config of a run on 2 processes given ``config`` as trainer.deepspeed.config."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    options = trainer("deepspeed_zero2", f"trainer.deepspeed.config={path}", *overrides)
    return distributed.deepspeed_settings(options, batch, accumulation, 2)


def test_a_deepspeed_json_is_the_config_and_the_trainer_fills_what_it_leaves_out(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    config = settings_with(HF_STYLE, tmp_path, "trainer.precision=bf16", "trainer.grad_clip=0.5")
    ours = deepspeed_config(
        trainer("deepspeed_zero2", "trainer.precision=bf16", "trainer.grad_clip=0.5"), 8, 2, 2
    )
    assert config["train_batch_size"] == 32 and config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {**HF_STYLE["zero_optimization"]}  # the file's, whole
    assert config["wall_clock_breakdown"] is False  # the file's own keys stay
    assert config["fp16"] == {"enabled": False, "loss_scale": 0, "initial_scale_power": 12}
    assert config["bf16"] == {"enabled": False}  # bf16 is torch autocast in the engine
    assert config["torch_autocast"] == ours["torch_autocast"] and config["communication_data_type"] == "fp32"
    assert config["steps_per_print"] == ours["steps_per_print"]  # what the file leaves out is ours
    assert settings_with({}, tmp_path) == deepspeed_config(trainer("deepspeed_zero2"), 8, 2, 2)


DISAGREEING = [  # (the file, overrides, the error's text)
    ({"train_micro_batch_size_per_gpu": 16}, [],
     "train_micro_batch_size_per_gpu=16 but data.batch_size gives 8: make them agree (change data.batch_size, "
     'or set train_micro_batch_size_per_gpu to 8 or "auto" in the file)'),
    ({"gradient_accumulation_steps": 1}, [], "gradient_accumulation_steps=1 but trainer.global_batch_size"),
    ({"gradient_clipping": 5.0}, [], "gradient_clipping=5.0 but trainer.grad_clip gives 1.0"),
    ({"zero_optimization": {"stage": 3}}, [], "zero_optimization.stage=3 but trainer=deepspeed_zero<stage> gives 2"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, [],
     'zero_optimization.offload_optimizer.device="cpu" but trainer.deepspeed.offload_optimizer gives "none"'),
    ({"bf16": {"enabled": True}}, ["trainer.precision=bf16"],
     "bf16.enabled=true but trainer.precision (bf16 is torch_autocast here, never DeepSpeed's bf16 weights) gives false"),
    ({"fp16": {"enabled": True}}, [], "fp16.enabled=true but trainer.precision gives false"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, [], "torch_autocast.enabled=true but trainer.precision gives false"),
    ({"torch_autocast": {"dtype": "float16"}}, ["trainer.precision=bf16"],
     'torch_autocast.dtype="float16" but trainer.precision gives "bfloat16"'),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, [],
     "has a 'optimizer' section, but memetrain builds the optimizer from trainer.optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, [], "has a 'scheduler' section, but memetrain sets the learning rate"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, [],
     'zero_optimization.reduce_bucket_size is "auto", which memetrain does not fill'),
]  # fmt: skip


@pytest.mark.parametrize(("config", "overrides", "message"), DISAGREEING)
def test_a_deepspeed_json_that_disagrees_with_the_trainer_is_one_error(tmp_path, config, overrides, message):
    with pytest.raises(ConfigError) as refused:
        settings_with(config, tmp_path, *overrides)
    assert str(refused.value).startswith(f"trainer.deepspeed.config={tmp_path / 'ds.json'}"), str(
        refused.value
    )
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_agreeing_values_and_dtype_spellings_pass(tmp_path):
    agreeing = {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 32,
        "gradient_clipping": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
        "torch_autocast": {"enabled": True, "dtype": "bf16"},
    }  # fmt: skip
    config = settings_with(agreeing, tmp_path, "trainer.precision=bf16")
    assert (
        config["torch_autocast"]["dtype"] == "bf16"
    )  # the file's spelling, which DeepSpeed reads as bfloat16


def test_where_a_deepspeed_json_comes_from(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text("{}")
    monkeypatch.setenv(
        "ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path)
    )  # an accelerate config's deepspeed_config_file
    assert distributed.deepspeed_json(trainer("deepspeed_zero2")) == (
        path,
        f"the accelerate config's deepspeed_config_file {path}",
    )
    assert (
        distributed.deepspeed_json(trainer("deepspeed_zero2", f"trainer.deepspeed.config={path}"))[0] == path
    )
    other = tmp_path / "other.json"
    with pytest.raises(
        ConfigError, match=f"deepspeed_config_file is {path} but trainer.deepspeed.config={other}"
    ):
        distributed.deepspeed_json(trainer("deepspeed_zero2", f"trainer.deepspeed.config={other}"))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")  # Accelerate's word for none
    assert distributed.deepspeed_json(trainer("deepspeed_zero2")) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it (No such file or directory)"),
        ('{"zero_optimization": ', "is not JSON (Expecting value"),
        ("[1]", "holds a JSON list, not a DeepSpeed config"),
    ],
)
def test_a_deepspeed_json_that_cannot_be_read_is_one_error(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    options = trainer("deepspeed_zero2", f"trainer.deepspeed.config={path}")
    with pytest.raises(
        ConfigError, match=re.escape(f"trainer.deepspeed.config={path}") + ".*" + re.escape(message)
    ):
        distributed.deepspeed_settings(options, 8, 2, 2)


def test_a_deepspeed_json_without_deepspeed_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match="is a DeepSpeed config but trainer.strategy=ddp: add trainer=deepspeed_zero"
    ):
        check_trainer(trainer("ddp", f"trainer.deepspeed.config={tmp_path / 'ds.json'}"), 2, cuda=False)


def test_the_gpu_options_pass_the_checks_on_a_gpu():
    options = [
        "trainer.compile=true",
        "trainer.tf32=true",
        "trainer.cudnn_benchmark=true",
        "trainer.precision=fp16",
    ]
    check_trainer(
        trainer("deepspeed_zero3", *options, "trainer.deepspeed.optimizer=fused_adam"), 8, cuda=True
    )
    check_trainer(trainer("ddp", *options, "trainer.channels_last=true"), 8, cuda=True)


def test_tf32_and_cudnn_benchmark_default_to_on_with_a_gpu_and_do_nothing_on_cpu():
    """auto: the defaults, which a CPU run passes (it used to refuse tf32=true, then the default false)."""
    defaults = trainer("single")
    assert defaults["tf32"] == defaults["cudnn_benchmark"] == "auto"
    check_trainer(defaults, 1, cuda=False)
    assert distributed.gpu_backends(defaults, cuda=True) == {"tf32": True, "cudnn_benchmark": True}
    assert distributed.gpu_backends(defaults, cuda=False) == {"tf32": False, "cudnn_benchmark": False}
    deterministic = trainer("single", "trainer.deterministic=true")
    assert distributed.gpu_backends(deterministic, cuda=True) == {"tf32": True, "cudnn_benchmark": False}
    off = trainer("single", "trainer.tf32=false", "trainer.cudnn_benchmark=false")
    assert distributed.gpu_backends(off, cuda=True) == {"tf32": False, "cudnn_benchmark": False}


def test_set_gpu_backends_sets_torch_s_flags():
    saved = (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
        torch.backends.cudnn.benchmark,
    )
    try:
        distributed.set_gpu_backends({"tf32": True, "cudnn_benchmark": True})
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.backends.cudnn.benchmark
        distributed.set_gpu_backends({"tf32": False, "cudnn_benchmark": False})
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[:2]
        torch.backends.cudnn.benchmark = saved[2]


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("deepspeed_zero1", ["trainer.channels_last=true"], "ZeRO (every stage) flattens the parameters"),
        (
            "ddp",
            ["trainer.cudnn_benchmark=true", "trainer.deterministic=true"],
            "trainer.deterministic=true rules out",
        ),
        ("ddp", ["trainer.tf32=sometimes"], "trainer.tf32='sometimes': choose auto"),
    ],
)
def test_gpu_settings_that_contradict_each_other_are_refused_on_a_gpu(name, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trainer(trainer(name, *overrides), 2, cuda=True)


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
    assert config["torch_autocast"]["enabled"] and config["torch_autocast"]["dtype"] == "bfloat16"
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]


def test_deepspeed_bf16_accumulates_and_averages_gradients_in_float32():
    """bf16 compute under DeepSpeed's torch autocast, but no module's gradient is averaged in bf16
    (DeepSpeed's default for Linear and Conv weights): float32 weights, gradients and reduction,
    as under DDP (tests/engine/test_gpu_paths_distributed.py checks the reduced values)."""
    config = deepspeed_config(trainer("deepspeed_zero2", "trainer.precision=bf16"), 4, 1, 2)
    assert config["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    assert config["communication_data_type"] == "fp32"
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert not config["bf16"]["enabled"]  # DeepSpeed's bf16 mode would hold the weights in bf16


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
