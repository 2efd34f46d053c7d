"""Processes and devices: one Accelerator set up from the trainer config and the launcher's env.

torchrun, ``accelerate launch`` and Slurm all set RANK/WORLD_SIZE/MASTER_ADDR (or their Slurm
equivalents, read by Accelerate); gloo is used on CPU, NCCL on GPU.
"""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

from memetrain.errors import ConfigError

PRECISIONS = ("no", "bf16", "fp16")


def world_size() -> int:
    """Processes in this run, from the launcher's environment, before anything is initialised."""
    return int(os.environ.get("WORLD_SIZE", 1))


def build_accelerator(precision: str, accumulation: int, timeout_minutes: float) -> Accelerator:
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    cpu = not torch.cuda.is_available()
    if precision == "fp16" and cpu:
        raise ConfigError(
            "trainer.precision=fp16 needs a GPU (loss scaling is a CUDA feature); use bf16 or no"
        )
    timeout = InitProcessGroupKwargs(
        backend="gloo" if cpu else "nccl", timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=accumulation,
        kwargs_handlers=[timeout] if world_size() > 1 else [],
    )


def shutdown() -> None:
    """Leave the process group cleanly (an abort at exit was seen without the barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    PartialState._reset_state()
