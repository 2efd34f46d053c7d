"""The trainer options that change the method before it is prepared: gradient checkpointing,
channels-last layout, and what DeepSpeed needs of the method (no 0-d parameters, ZeRO-3 limits)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from memetrain.engine.zero import vectorize_scalar_parameters
from memetrain.errors import ConfigError
from memetrain.methods import Method
from memetrain.models.memory import enable_gradient_checkpointing, use_channels_last

log = logging.getLogger(__name__)


def apply_trainer_options(method: Method, trainer: Mapping[str, Any], stages: int) -> list[str]:
    """Apply ``trainer``'s model options to ``method`` (trained in ``stages`` stages), before its
    optimizer is built; returns the names of the 0-d parameters made vectors for DeepSpeed."""
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
