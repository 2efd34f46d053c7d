"""Processes and devices: one Accelerator set up from the trainer config and the launcher's env.

torchrun, ``accelerate launch`` and the ``deepspeed`` launcher set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT themselves. A task started directly by ``srun`` (or by submitit, which
runs its tasks through srun) only has Slurm's variables: :func:`env_from_slurm`
(:mod:`memetrain.slurm_env`, the one home of that mapping) maps those to the torch ones before the
Accelerator is built. gloo is used on CPU, NCCL on GPU. The process group forms here, before the
Accelerator: its rendezvous waits at most its own bound (the ranks that never came are named), and
every collective after it waits at most ``trainer.timeout_minutes``. A launch that asked for GPUs
never trains on the CPU because CUDA is unusable here: it stops and says why
(:func:`check_gpu_request`). What ``accelerate launch`` asks for (mixed precision; with a DeepSpeed
config its ZeRO stage, offload devices and ``deepspeed_config_file``) is either what the run does or
stops it with one line: the trainer config decides and must agree (:func:`_check_accelerate_launch`,
:func:`deepspeed_settings`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch import nn

from memetrain.engine.zero import (
    check_deepspeed,
    decided_settings,
    deepspeed_config,
    merged_deepspeed_config,
    read_deepspeed_json,
)
from memetrain.errors import PEER_FAILED_EXIT_CODE, ConfigError, MemetrainError
from memetrain.slurm_env import env_from_slurm as env_from_slurm  # run.py maps Slurm's variables through it
from memetrain.slurm_env import single_device_env, visible_devices

PRECISIONS = ("no", "bf16", "fp16")
AUTO_OPTION = ("auto", True, False)  # trainer.tf32, trainer.cudnn_benchmark
STRATEGIES = ("single", "ddp", "deepspeed")
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the CUBLAS_WORKSPACE_CONFIG values cuBLAS is deterministic with
TORCH_WHEELS = "https://download.pytorch.org/whl"


def world_size() -> int:
    """Processes in this run, from the launcher's environment, before anything is initialised."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_trainer(trainer: Mapping[str, Any], processes: int, cuda: bool) -> None:
    """Refuse trainer settings this machine and launch cannot honour, before any process group."""
    strategy, precision = trainer["strategy"], trainer["precision"]
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "trainer.precision=fp16 needs a GPU (loss scaling is a CUDA feature); use bf16 or no"
        )
    if strategy == "ddp" and processes == 1:
        raise ConfigError(
            "trainer=ddp but this is one process: start it with torchrun --nproc_per_node N, accelerate "
            "launch --config_file configs/accelerate/<launch>.yaml or srun (one task per GPU); "
            "trainer=single runs one process"
        )
    if strategy == "deepspeed":
        check_deepspeed(trainer["deepspeed"], cuda)
    elif trainer["deepspeed"]["config"] is not None:
        raise ConfigError(
            f"trainer.deepspeed.config={trainer['deepspeed']['config']} is a DeepSpeed config but trainer.strategy="
            f"{strategy}: add trainer=deepspeed_zero<stage> (the stage the file's zero_optimization.stage names)"
        )
    _check_accelerate_launch(trainer)
    for option in ("tf32", "cudnn_benchmark"):
        if trainer[option] not in AUTO_OPTION:
            raise ConfigError(f"trainer.{option}={trainer[option]!r}: choose auto (on GPUs), true or false")
    for option in ("compile", "tf32", "cudnn_benchmark", "channels_last"):
        if trainer[option] is True and not cuda:
            raise ConfigError(
                f"trainer.{option}=true is a GPU option (on CPU it is slower or does nothing); set it to "
                + ("auto or false" if option in ("tf32", "cudnn_benchmark") else "false")
            )
    if trainer["cudnn_benchmark"] is True and trainer["deterministic"]:
        raise ConfigError(
            "trainer.cudnn_benchmark=true times several convolution algorithms and keeps the fastest, which "
            "trainer.deterministic=true rules out: set cudnn_benchmark to auto (off when deterministic) or false"
        )
    if trainer["channels_last"] and strategy == "deepspeed":
        raise ConfigError(
            "trainer.channels_last=true with DeepSpeed: ZeRO (every stage) flattens the parameters into contiguous "
            "buffers, so the convolution weights lose the channels-last layout and each convolution converts "
            "them back; set trainer.channels_last=false, or train with trainer=ddp"
        )


def gpu_backends(trainer: Mapping[str, Any], cuda: bool) -> dict[str, bool]:
    """``trainer.tf32`` and ``trainer.cudnn_benchmark`` resolved: auto is on with a GPU (TF32 matmuls
    and convolutions; cuDNN's choice of the fastest convolution algorithm per input shape, unless
    ``trainer.deterministic``) and off on CPU, where neither means anything."""
    tf32, benchmark = trainer["tf32"], trainer["cudnn_benchmark"]
    return {
        "tf32": cuda if tf32 == "auto" else bool(tf32),
        "cudnn_benchmark": (cuda and not trainer["deterministic"])
        if benchmark == "auto"
        else bool(benchmark),
    }


def set_gpu_backends(settings: Mapping[str, bool]) -> None:
    """Set torch's backends from :func:`gpu_backends`: TF32 ("tf32") or full fp32 ("ieee") for
    matmuls and cuDNN convolutions, and ``torch.backends.cudnn.benchmark``."""
    precision = "tf32" if settings["tf32"] else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]


def _check_accelerate_launch(trainer: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> None:
    """What ``accelerate launch`` says (its flags and config arrive as ACCELERATE_* variables) must
    agree with the trainer config, which decides: its mixed precision (Accelerate passes ``no`` when
    none was asked for, which leaves ``trainer.precision`` in charge), and with a config of
    ``distributed_type: DEEPSPEED`` the strategy, ZeRO stage and offload devices. (Its
    ``deepspeed_config_file`` is read as a DeepSpeed JSON: :func:`deepspeed_json`.)"""
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched != "no" and launched != trainer["precision"]:
        raise ConfigError(
            f"accelerate launch asks for mixed precision {launched} (--mixed_precision or mixed_precision in its "
            f"config: ACCELERATE_MIXED_PRECISION={launched}) but trainer.precision={trainer['precision']}: make them "
            f"agree: add trainer.precision={launched}"
            + (
                " (a precision memetrain trains in)"
                if launched in PRECISIONS
                else " (memetrain trains in no, bf16 or fp16)"
            )
            + ", or launch with --mixed_precision no"
        )
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    if trainer["strategy"] != "deepspeed":
        raise ConfigError(
            "the accelerate config launches DeepSpeed but trainer.strategy="
            f"{trainer['strategy']}: add trainer=deepspeed_zero1/2/3 (ZeRO stage, offload and precision come "
            "from the trainer config), or launch with a MULTI_GPU config such as configs/accelerate/1node_8gpu.yaml"
        )
    options = trainer["deepspeed"]
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != options["zero_stage"]:
        raise ConfigError(
            f"the accelerate config asks for ZeRO stage {stage} but trainer.deepspeed.zero_stage="
            f"{options['zero_stage']}: make them agree (trainer=deepspeed_zero{stage})"
        )
    for variable, option in (
        ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer"),
        ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "offload_params"),
    ):
        device = environ.get(variable, "none").lower()
        if device != options[option]:
            field = variable.removeprefix("ACCELERATE_DEEPSPEED_").lower()
            raise ConfigError(
                f"the accelerate config asks for {field}: {device} ({variable}) but trainer.deepspeed.{option}="
                f"{options[option]}: make them agree (trainer.deepspeed.{option}={device})"
            )


def deepspeed_json(
    trainer: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> tuple[Path, str] | None:
    """The DeepSpeed JSON this run is given, and how it was named (for errors), or None: the
    trainer's ``trainer.deepspeed.config`` or an Accelerate config's ``deepspeed_config_file``
    (ACCELERATE_DEEPSPEED_CONFIG_FILE); both may name it, if they name the same file."""
    ours = trainer["deepspeed"]["config"]
    launched = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    launched = None if launched in (None, "", "none") else launched
    if ours is not None and launched is not None and Path(ours).resolve() != Path(launched).resolve():
        raise ConfigError(
            f"the accelerate config's deepspeed_config_file is {launched} but trainer.deepspeed.config={ours}: name "
            "one DeepSpeed JSON (the same file in both, or only one of them)"
        )
    if ours is not None:
        return Path(ours), f"trainer.deepspeed.config={ours}"
    if launched is not None:
        return Path(launched), f"the accelerate config's deepspeed_config_file {launched}"
    return None


def deepspeed_settings(
    trainer: Mapping[str, Any], batch_size: int, accumulation: int, processes: int
) -> dict[str, Any]:
    """The DeepSpeed config of this run: built from the trainer config, or a given DeepSpeed JSON
    (:func:`deepspeed_json`) filled and checked by the trainer config
    (:func:`memetrain.engine.zero.merged_deepspeed_config`)."""
    ours = deepspeed_config(trainer, batch_size, accumulation, processes)
    given = deepspeed_json(trainer)
    if given is None:
        return ours
    path, named = given
    decided = decided_settings(trainer, batch_size, accumulation, processes)
    return merged_deepspeed_config(read_deepspeed_json(path, named), named, ours, decided)


def build_accelerator(
    trainer: Mapping[str, Any],
    batch_size: int,
    accumulation: int,
    rendezvous_timeout_s: float | None = None,
) -> Accelerator:
    """The Accelerator for ``trainer`` (``configs/trainer/*.yaml``) with ``batch_size`` samples per
    process and micro-batch, and ``accumulation`` micro-batches per optimizer step.

    ``rendezvous_timeout_s``: how long the processes wait for each other to form the process
    group (:func:`form_process_group`); None: as long as a collective, ``trainer.timeout_minutes``.
    """
    if rendezvous_timeout_s is not None and not rendezvous_timeout_s > 0:
        raise ConfigError(
            f"trainer.rendezvous_timeout_s={rendezvous_timeout_s}: give the seconds the processes wait for each "
            "other at the start (> 0; a few minutes covers slow nodes and container starts)"
        )
    if trainer["deterministic"]:
        enable_determinism()  # before anything starts CUDA
    cuda = torch.cuda.is_available()
    if cuda:  # one GPU per task (srun --gpus-per-task 1, or the site binds them): LOCAL_RANK is 0
        os.environ.update(single_device_env(os.environ, torch.cuda.device_count()))
    else:
        check_gpu_request(os.environ)
    check_trainer(trainer, world_size(), cuda)
    if trainer["strategy"] == "deepspeed":  # a given DeepSpeed JSON is checked before the processes meet
        ds_config = deepspeed_settings(trainer, batch_size, accumulation, world_size())
        _single_process_group_env()
    handlers = []
    if world_size() > 1 or trainer["strategy"] == "deepspeed":
        backend, timeout = "nccl" if cuda else "gloo", datetime.timedelta(minutes=trainer["timeout_minutes"])
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
        if not torch.distributed.is_initialized():  # Accelerate and DeepSpeed use the group formed here
            if rendezvous_timeout_s is None:
                form_process_group(backend, timeout, timeout, "trainer.timeout_minutes")
            else:
                wait = datetime.timedelta(seconds=rendezvous_timeout_s)
                form_process_group(backend, timeout, wait, "trainer.rendezvous_timeout_s")
    if world_size() > 1 and trainer["strategy"] != "deepspeed":
        handlers.append(DistributedDataParallelKwargs(**trainer["ddp"]))
    if cuda:
        set_gpu_backends(gpu_backends(trainer, cuda))
    common = dict(
        gradient_accumulation_steps=accumulation,
        kwargs_handlers=handlers,
        dynamo_backend="inductor" if trainer["compile"] else "no",  # compiles the prepared model
    )
    if trainer["strategy"] == "deepspeed":
        # An accelerate DeepSpeed launch lists the fields its config set; they were checked against
        # the trainer config above, which makes DeepSpeed's config with a given JSON (Accelerate
        # refuses a config file beside those fields, and would read its file in place of ours).
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        # ACCELERATE_USE_CPU (what an accelerate launch needs on a machine without GPUs: see
        # check_gpu_request, already passed) would make Accelerate drop DeepSpeed without a word
        # and train as plain DDP; DeepSpeed runs on the CPU over gloo here.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        # DeepSpeed owns precision (its config): Accelerate's autocast stays off, and fp16 is named
        # only so that Accelerate leaves the loss scaling to DeepSpeed. cpu=False even on a CPU
        # machine: Accelerate's CPU mode would not start DeepSpeed (the gloo backend runs it there).
        return Accelerator(
            mixed_precision="fp16" if trainer["precision"] == "fp16" else "no",
            # zero3_init_flag=False: models are built whole on every rank (as without DeepSpeed,
            # so our weight loading and checks see real tensors) and ZeRO-3 shards them at prepare
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=False),
            **common,
        )
    return Accelerator(cpu=not cuda, mixed_precision=trainer["precision"], **common)


# -- precision outside the training step -------------------------------------------------------------


def training_autocast(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """The training precision for forward passes of the method outside its prepared wrapper
    (validation, evaluation): Accelerate's autocast, or under DeepSpeed (whose engine applies its
    own torch autocast, and Accelerate's stays off) the engine's, from the DeepSpeed config. Under
    DeepSpeed fp16 the weights themselves are fp16 and nothing is needed."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return accelerator.autocast()
    autocast = plugin.deepspeed_config.get("torch_autocast", {})
    if not autocast.get("enabled"):
        return contextlib.nullcontext()
    dtype = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    return torch.autocast(accelerator.device.type, dtype=dtype[str(autocast.get("dtype", "bfloat16"))])


# -- buffers ----------------------------------------------------------------------------------------


def running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The buffers of ``module`` that each rank updates from its own batches: the running mean,
    variance and batch count of norm layers that track them (BatchNorm, InstanceNorm with
    ``track_running_stats``), unless synchronised (SyncBatchNorm updates them from every rank's
    batch alike). Non-persistent buffers (constants such as the image normaliser's) are not
    listed, nor other state a module keeps equal on every rank itself (DINO's all-reduced center)."""
    found = []
    for norm in module.modules():
        if not isinstance(norm, nn.modules.batchnorm._NormBase) or isinstance(norm, nn.SyncBatchNorm):
            continue
        for name, buffer in norm.named_buffers(recurse=False):
            if buffer is not None and name not in norm._non_persistent_buffers_set:
                found.append(buffer)
    return found


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors`` in one broadcast: flattened into one float64
    vector (exact for float16/bfloat16/float32 values and integers below 2^53, such as batch counts)."""
    if not tensors or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    flat = torch.cat([tensor.detach().reshape(-1).to(torch.float64) for tensor in tensors])
    torch.distributed.broadcast(flat, src=0)
    for tensor, values in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
        tensor.copy_(values.view_as(tensor))


# -- determinism ------------------------------------------------------------------------------------


def enable_determinism(environ: MutableMapping[str, str] = os.environ) -> None:
    """``trainer.deterministic=true``: deterministic algorithms only, cuBLAS included.

    cuBLAS is deterministic only with a fixed workspace, CUBLAS_WORKSPACE_CONFIG=:4096:8 (or
    :16:8), read when CUDA creates its first cuBLAS handle: it is set here unless already one of
    those, and refused when CUDA started in this process without it. :func:`build_accelerator`
    calls this first when the trainer asks for determinism.
    """
    if environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        if torch.cuda.is_initialized():
            raise ConfigError(
                "trainer.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts, and CUDA "
                "already started in this process: export CUBLAS_WORKSPACE_CONFIG=:4096:8 before launching"
            )
        environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    torch.use_deterministic_algorithms(True, warn_only=False)


# -- no silent CPU fallback -------------------------------------------------------------------------


def gpu_request(environ: Mapping[str, str]) -> str | None:
    """What in ``environ`` asked this process for a GPU (``NAME=value``), or None.

    Slurm's GPU allocation (SLURM_GPUS_ON_NODE, SLURM_STEP_GPUS, SLURM_JOB_GPUS), a
    CUDA_VISIBLE_DEVICES that names devices, or an ``accelerate launch`` of several processes
    without ACCELERATE_USE_CPU (a MULTI_GPU or DEEPSPEED config: configs/accelerate/*gpu.yaml).
    """
    gpus = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus.isdigit() and int(gpus) > 0:
        return f"SLURM_GPUS_ON_NODE={gpus}"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(name, "").strip():
            return f"{name}={environ[name]}"
    if visible_devices(environ):
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
    accelerate_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes", "y", "on", "t")
    if "ACCELERATE_MIXED_PRECISION" in environ and "LOCAL_RANK" in environ and not accelerate_cpu:
        return "an accelerate launch config for GPUs (ACCELERATE_USE_CPU unset)"
    return None


def check_gpu_request(environ: Mapping[str, str]) -> None:
    """Refuse to train on the CPU when the launch asked for a GPU and CUDA is unusable here."""
    request = gpu_request(environ)
    if request is not None:
        raise ConfigError(no_cuda_message(request, torch.__version__, torch.version.cuda, nvidia_driver()))


def no_cuda_message(
    request: str, torch_version: str, torch_cuda: str | None, driver: tuple[str, str | None] | None
) -> str:
    """Why CUDA is unusable and which torch wheel to install. ``driver``: (driver version, the
    newest CUDA it runs, None if unknown) from :func:`nvidia_driver`, None where no driver answers."""
    release = torch_version.split("+")[0]
    if torch_cuda is None:
        why = f"torch {torch_version} is a CPU-only build"
    elif driver is None:
        why = f"no NVIDIA driver answers here (no nvidia-smi, no /proc/driver/nvidia): CUDA is unusable (torch {torch_version} is built for CUDA {torch_cuda})"
    elif driver[1] is None:
        why = f"NVIDIA driver {driver[0]} is loaded but nvidia-smi does not answer: CUDA is unusable (torch {torch_version} is built for CUDA {torch_cuda})"
    elif _version(driver[1]) < _version(torch_cuda):
        why = f"torch {torch_version} is built for CUDA {torch_cuda}, newer than the CUDA {driver[1]} that NVIDIA driver {driver[0]} runs"
    else:
        why = (
            f"CUDA is unusable although NVIDIA driver {driver[0]} (CUDA {driver[1]}) runs torch {torch_version}'s "
            f"CUDA {torch_cuda}: check that the devices in CUDA_VISIBLE_DEVICES exist (nvidia-smi)"
        )
    if driver is not None and driver[1] is not None:
        wheel = "cu" + "".join(driver[1].split(".")[:2])
        install = (
            f"pip install torch=={release} --index-url {TORCH_WHEELS}/{wheel} (or update the NVIDIA driver)"
        )
    else:
        install = (
            f"pip install torch=={release} --index-url {TORCH_WHEELS}/cuXYZ, XYZ from the 'CUDA Version' that "
            "nvidia-smi prints on the GPU node (e.g. cu126)"
        )
    if request.startswith("SLURM_"):
        instead = "submit without GPUs (no --gpus, --gres=gpu)"
    elif request.startswith("CUDA_VISIBLE_DEVICES"):
        instead = "unset CUDA_VISIBLE_DEVICES"
    else:
        instead = "set ACCELERATE_USE_CPU=1"
    return (
        f"{request} asks for a GPU but torch.cuda.is_available() is False: {why}. Install the matching build: "
        f"{install}; or {instead} to train on the CPU"
    )


def nvidia_driver() -> tuple[str, str | None] | None:
    """(the NVIDIA driver's version, the newest CUDA it runs) from nvidia-smi; (version, None) from
    /proc/driver/nvidia/version; None where neither is readable."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", out), re.search(r"CUDA Version:\s*([\d.]+)", out)
    if driver:
        return driver.group(1), cuda.group(1) if cuda else None
    try:
        module = re.search(
            r"Kernel Module\S*\s+(?:for \S+\s+)?([\d.]+)", Path("/proc/driver/nvidia/version").read_text()
        )
    except OSError:
        return None
    return (module.group(1), None) if module else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


# -- the process group ------------------------------------------------------------------------------


class RendezvousFailed(MemetrainError):
    """The processes of a run did not all meet to form the process group within the bound."""


_rendezvous_round = 0  # rounds in this process: a group formed again (after shutdown) meets under new keys


def form_process_group(
    backend: str,
    timeout: datetime.timedelta,
    wait: datetime.timedelta,
    bound: str,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Form the default process group from RANK, WORLD_SIZE and MASTER_ADDR/PORT (env://), with
    the rendezvous bounded by ``wait`` (named ``bound`` in errors) and collectives by ``timeout``.

    Every rank connects to the TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 hosts it; under torchrun
    its agent does), records its rank and counts itself in; the last to arrive says so. A rank
    still waiting at the bound raises :class:`RendezvousFailed` naming the ranks that never arrived
    (a rank that cannot reach the store names WORLD_SIZE and the address), instead of waiting
    ``trainer.timeout_minutes`` inside the backend's own connect.
    """
    global _rendezvous_round
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise ConfigError(
                f"{name} is not set but WORLD_SIZE={environ.get('WORLD_SIZE', '1')}: start the processes with "
                "torchrun, accelerate launch or srun, which set RANK, WORLD_SIZE and MASTER_ADDR/MASTER_PORT"
            )
    rank, processes = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    address, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    where, seconds = f"{address}:{port}", f"{wait.total_seconds():g} s ({bound})"
    agent = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    hosts = rank == 0 and not agent
    deadline = time.monotonic() + wait.total_seconds()
    try:
        store = torch.distributed.TCPStore(
            address, port, processes, is_master=hosts, timeout=wait, wait_for_workers=False, multi_tenant=True
        )
    except torch.distributed.DistError as error:
        cause = str(error).strip().splitlines()[0]
        if hosts:
            raise RendezvousFailed(
                f"rank 0 of {processes} could not host the rendezvous at MASTER_ADDR:MASTER_PORT={where} ({cause}): "
                "another program may hold the port; set MASTER_PORT to a free one"
            ) from None
        raise RendezvousFailed(
            f"rank {rank} of {processes} (WORLD_SIZE={processes}) reached no rendezvous at MASTER_ADDR:MASTER_PORT="
            f"{where} within {seconds}: the host of rank 0 did not start it or is not reachable from here ({cause})"
        ) from None
    meeting = torch.distributed.PrefixStore(f"memetrain/rendezvous/{_rendezvous_round}", store)
    _rendezvous_round += 1
    meeting.set(f"rank_{rank}", socket.gethostname())
    if meeting.add("arrived", 1) == processes:
        meeting.set("complete", "1")
    try:
        meeting.wait(["complete"], datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0)))
    except torch.distributed.DistError:
        message = _missing_ranks(meeting, rank, processes, where, seconds)
        _report_and_outlast(meeting, hosts, wait)
        raise RendezvousFailed(message) from None
    store.set_timeout(timeout)
    torch.distributed.init_process_group(
        backend, store=store, rank=rank, world_size=processes, timeout=timeout
    )


def _report_and_outlast(meeting, hosts: bool, wait: datetime.timedelta) -> None:
    """Count this rank's failed wait in; the host of the store stays until every rank that arrived
    has read which ranks are missing (or ``wait`` more passed): the ranks' deadlines differ by their
    start times, and a host that exited first would leave the others unable to name the missing."""
    try:
        if meeting.add("reported", 1) >= meeting.add("arrived", 0):
            meeting.set("all_reported", "1")
        if hosts:
            meeting.wait(["all_reported"], wait)
    except torch.distributed.DistError:  # the host is gone, or a rank never reported: nothing to wait for
        pass


def _missing_ranks(meeting, rank: int, processes: int, where: str, seconds: str) -> str:
    """The error line of a rendezvous that timed out: which ranks never arrived, if the store says."""
    try:
        missing = [r for r in range(processes) if not meeting.check([f"rank_{r}"])]
    except torch.distributed.DistError:  # the host of the store is gone
        missing = None
    if not missing:
        return (
            f"rank {rank} of {processes}: the rendezvous at MASTER_ADDR:MASTER_PORT={where} (WORLD_SIZE={processes}) "
            f"did not complete within {seconds}; the other ranks' logs say why"
        )
    return (
        f"rank {rank} of {processes}: rank(s) {', '.join(map(str, missing))} did not reach the rendezvous at "
        f"MASTER_ADDR:MASTER_PORT={where} within {seconds}: they did not start or failed before it (their "
        "logs say why); rerunning the same command resumes from the newest checkpoint"
    )


def _single_process_group_env() -> None:
    """DeepSpeed always runs in a process group: give a process started without a launcher
    (``python launcher/train.py trainer=deepspeed_zero2``: one GPU, ZeRO-Offload) a group of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


class PeerFailure(MemetrainError):
    """A collective failed because another process of the run died or cannot be reached.

    Past it, the interpreter's exit may abort in gloo's C++ threads ("terminate called without an
    active exception", exit -6: seen once in CI, after the error line had been printed)."""

    safe_teardown = False
    exit_code = PEER_FAILED_EXIT_CODE


def shutdown() -> None:
    """Leave the process group cleanly (an abort at exit was seen without the barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    PartialState._reset_state()


def leave_after_failure(error: BaseException) -> None:
    """Leave the process group without waiting for the others (one may be dead), and turn a
    collective that failed on a dead peer into one clear :class:`PeerFailure`.

    gloo notices a peer that died at once (its TCP connection closes) and raises here; NCCL
    only when the collective times out (``trainer.timeout_minutes``). Under torchrun the agent
    also stops every other worker as soon as one exits, and reports which rank failed first.
    """
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not group:
        return
    rank, processes = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.distributed.destroy_process_group()
    PartialState._reset_state()
    collective = isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "gloo" in str(error)
    )
    if collective and processes > 1:
        cause = str(error).strip().splitlines()[0]
        raise PeerFailure(
            f"rank {rank} of {processes}: a collective operation failed because another process of this run "
            f"died or cannot be reached ({cause}); this one stops too. The first error in the other ranks' "
            "logs is the cause; rerunning the same command resumes from the newest checkpoint"
        ) from None
