"""Processes and devices: one Accelerator set up from the trainer config and the launcher's env.

torchrun, ``accelerate launch`` and the ``deepspeed`` launcher set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT themselves. A task started directly by ``srun`` (or by submitit, which
runs its tasks through srun) only has Slurm's variables: :func:`env_from_slurm` maps those to the
torch ones before the Accelerator is built. gloo is used on CPU, NCCL on GPU; every collective
waits at most ``trainer.timeout_minutes``.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

from memetrain.engine.zero import check_deepspeed, deepspeed_config
from memetrain.errors import ConfigError, MemetrainError

PRECISIONS = ("no", "bf16", "fp16")
STRATEGIES = ("single", "ddp", "deepspeed")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000
"""MASTER_PORT derived from the Slurm job id when none is set: the same on every task of a job,
different for jobs that share a node."""


def env_from_slurm(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set torch's env:// variables in ``environ`` from Slurm's, for a task started by srun.

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID,
    LOCAL_WORLD_SIZE = this node's count in SLURM_STEP_TASKS_PER_NODE, NODE_RANK = SLURM_NODEID,
    MASTER_ADDR = the first host of SLURM_STEP_NODELIST (where task 0 runs under Slurm's block and
    cyclic distributions), MASTER_PORT = 20000 + SLURM_JOB_ID mod 20000 unless MASTER_ADDR/PORT
    are set already. Nothing changes when a launcher set RANK (torchrun or ``accelerate launch``
    started by srun, one per node), or outside an srun step (no SLURM_STEP_NUM_TASKS): a batch
    script that runs ``python launcher/train.py`` itself is one process, whatever it allocated.
    Returns the variables it set.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    node = int(environ.get("SLURM_NODEID", "0"))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
    mapped = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "NODE_RANK": str(node),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": environ.get("MASTER_PORT")
        or str(SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN),
    }
    if "SLURM_STEP_TASKS_PER_NODE" in environ:
        mapped["LOCAL_WORLD_SIZE"] = str(tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])[node])
    environ.update(mapped)
    return mapped


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-010,12],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist.strip())
    if match is None:
        raise ConfigError(f"cannot read a host name from the Slurm node list {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts per node: ``4(x2),3`` -> ``[4, 4, 3]``."""
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    return counts


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
    _check_accelerate_launch(trainer)
    for option in ("compile", "tf32", "channels_last"):
        if trainer[option] and not cuda:
            raise ConfigError(
                f"trainer.{option}=true is a GPU option (on CPU it is slower or does nothing); set it to false"
            )


def _check_accelerate_launch(trainer: Mapping[str, Any]) -> None:
    """An ``accelerate launch`` config with ``distributed_type: DEEPSPEED`` (its settings arrive as
    ACCELERATE_* variables) must agree with the trainer config, which is what DeepSpeed gets."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    if trainer["strategy"] != "deepspeed":
        raise ConfigError(
            "the accelerate config launches DeepSpeed but trainer.strategy="
            f"{trainer['strategy']}: add trainer=deepspeed_zero1/2/3 (ZeRO stage, offload and precision come "
            "from the trainer config), or launch with a MULTI_GPU config such as configs/accelerate/1node_8gpu.yaml"
        )
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and int(stage) != trainer["deepspeed"]["zero_stage"]:
        raise ConfigError(
            f"the accelerate config asks for ZeRO stage {stage} but trainer.deepspeed.zero_stage="
            f"{trainer['deepspeed']['zero_stage']}: make them agree (trainer=deepspeed_zero{stage})"
        )


def build_accelerator(trainer: Mapping[str, Any], batch_size: int, accumulation: int) -> Accelerator:
    """The Accelerator for ``trainer`` (``configs/trainer/*.yaml``) with ``batch_size`` samples per
    process and micro-batch, and ``accumulation`` micro-batches per optimizer step."""
    cuda = torch.cuda.is_available()
    check_trainer(trainer, world_size(), cuda)
    handlers = []
    if world_size() > 1 or trainer["strategy"] == "deepspeed":
        timeout = datetime.timedelta(minutes=trainer["timeout_minutes"])
        handlers.append(InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout))
    if world_size() > 1 and trainer["strategy"] != "deepspeed":
        handlers.append(DistributedDataParallelKwargs(**trainer["ddp"]))
    if trainer["tf32"]:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    common = dict(
        gradient_accumulation_steps=accumulation,
        kwargs_handlers=handlers,
        dynamo_backend="inductor" if trainer["compile"] else "no",  # compiles the prepared model
    )
    if trainer["strategy"] == "deepspeed":
        _single_process_group_env()
        # An accelerate DeepSpeed launch lists the fields its config set; they were checked against
        # the trainer config above, which alone makes DeepSpeed's config (Accelerate refuses both).
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        config = deepspeed_config(trainer, batch_size, accumulation, world_size())
        # DeepSpeed owns precision (its config): Accelerate's autocast stays off, and fp16 is named
        # only so that Accelerate leaves the loss scaling to DeepSpeed. cpu=False even on a CPU
        # machine: Accelerate's CPU mode would not start DeepSpeed (the gloo backend runs it there).
        return Accelerator(
            mixed_precision="fp16" if trainer["precision"] == "fp16" else "no",
            # zero3_init_flag=False: models are built whole on every rank (as without DeepSpeed,
            # so our weight loading and checks see real tensors) and ZeRO-3 shards them at prepare
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False),
            **common,
        )
    return Accelerator(cpu=not cuda, mixed_precision=trainer["precision"], **common)


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
