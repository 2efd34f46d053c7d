"""The trainer options that change the method before it is prepared: gradient checkpointing,
channels-last layout, synchronised batch norm, and what DeepSpeed needs of the method (no 0-d
parameters, ZeRO-3 limits)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memetrain.engine.zero import vectorize_scalar_parameters
from memetrain.errors import ConfigError
from memetrain.methods import Method
from memetrain.models.memory import enable_gradient_checkpointing, use_channels_last

log = logging.getLogger(__name__)


def apply_trainer_options(
    method: Method,
    trainer: Mapping[str, Any],
    stages: int,
    processes: int | None = None,
    cuda: bool | None = None,
) -> list[str]:
    """Apply ``trainer``'s model options to ``method`` (trained in ``stages`` stages), before its
    optimizer is built; returns the names of the 0-d parameters made vectors for DeepSpeed.
    ``processes`` (default: WORLD_SIZE) and ``cuda`` (default: whether CUDA is usable) say where
    it trains."""
    processes = int(os.environ.get("WORLD_SIZE", 1)) if processes is None else processes
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if sync_batchnorm(method, trainer["sync_batchnorm"], processes, cuda):
        converted = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
        nn.SyncBatchNorm.convert_sync_batchnorm(method)
        log.info(
            "trainer.sync_batchnorm: %d batch norms take their statistics over %d processes",
            converted,
            processes,
        )
    if trainer["gradient_checkpointing"]:
        enabled, unsupported = enable_gradient_checkpointing(method)
        if enabled:
            log.info("gradient checkpointing: %s", ", ".join(enabled))
        if unsupported:
            log.warning(
                "trainer.gradient_checkpointing: %s cannot checkpoint (an LSTM runs as one kernel; VGG has "
                "no blocks to cut) and keep their activations",
                ", ".join(unsupported),
            )
    if trainer["channels_last"]:
        use_channels_last(method)
    if trainer["strategy"] != "deepspeed":
        return []
    if trainer["deepspeed"]["zero_stage"] == 3:
        if stages > 1:
            raise ConfigError(
                f"method {method.name} trains in {stages} stages, each with its own optimizer, and a second "
                "DeepSpeed engine cannot take over weights ZeRO-3 has already partitioned: use "
                "trainer=deepspeed_zero2 (or zero1, or ddp)"
            )
        if type(method).after_step is not Method.after_step:
            raise ConfigError(
                f"method {method.name} changes weights after each optimizer step (an EMA teacher, a clamp), "
                "outside the optimizer, and ZeRO-3 holds only a slice of each weight on a rank: use "
                "trainer=deepspeed_zero2 (or zero1, or ddp)"
            )
    return vectorize_scalar_parameters(method)


def sync_batchnorm(method: Method, option: bool | str, processes: int, cuda: bool) -> bool:
    """Whether ``method``'s batch norms become :class:`torch.nn.SyncBatchNorm` (statistics over every
    process's batch, as DINO's ``main_dino.py`` converts student and teacher): ``trainer.sync_batchnorm``
    true, or auto for methods that ask for it (:attr:`Method.sync_batchnorm`: DINO, CASS), when
    several processes train on GPUs and the method has a batch norm. torch computes the
    synchronised statistics with CUDA kernels only (``batch_norm_stats``; SyncBatchNorm refuses CPU
    input): on CPU, true is refused and auto keeps each rank's own statistics."""
    if option not in ("auto", True, False):
        raise ConfigError(f"trainer.sync_batchnorm={option!r}: choose auto, true or false")
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
    if option is False or processes == 1 or not has_batchnorm:
        return False
    if option == "auto" and not method.sync_batchnorm:
        return False
    if not cuda:
        if option is True:
            raise ConfigError(
                "trainer.sync_batchnorm=true needs GPUs: torch synchronises batch-norm statistics with CUDA "
                "kernels only; on CPU set it to auto or false (each process normalises over its own batch)"
            )
        log.info(
            "method %s normalises over each process's own batch on CPU (SyncBatchNorm runs on GPUs only)",
            method.name,
        )
        return False
    return True
