"""DeepSpeed ZeRO through Accelerate: the DeepSpeed config built from our trainer config, and the
two things our models need around it (no 0-d parameters, consolidated fp32 weights).

The batch semantics stay ours: ``train_batch_size`` is ``trainer.global_batch_size``, split as
``data.batch_size`` per process and micro-batch x processes x accumulation, exactly as without
DeepSpeed (DeepSpeed divides each micro-batch's loss by the accumulation, as Accelerate does
otherwise). The optimizer is ours (AdamW, decay groups), and its learning rate and weight decay are
set each step from the step (DeepSpeed has no scheduler here). Gradient clipping and the skip of
a step whose gradient is not finite are DeepSpeed's (its ZeRO optimizers skip such a step in
every precision and report it through ``engine.was_step_applied()``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

ZERO_STAGES = (1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
OPTIMIZERS = ("torch", "fused_adam")
NEVER = 2**31 - 1  # steps_per_print: our logger reports, DeepSpeed's would repeat it


def check_deepspeed(options: Mapping[str, Any], cuda: bool) -> None:
    """Refuse DeepSpeed options that cannot work here, naming the option and what to do."""
    stage = options["zero_stage"]
    if stage not in ZERO_STAGES:
        raise ConfigError(
            f"trainer.deepspeed.zero_stage={stage}: choose 1 (optimizer state sharded), 2 (+ gradients) "
            "or 3 (+ parameters); trainer=deepspeed_zero1/2/3 set it"
        )
    for option in ("offload_optimizer", "offload_params"):
        if options[option] not in OFFLOAD_DEVICES:
            raise ConfigError(
                f"trainer.deepspeed.{option}={options[option]!r}: choose one of {', '.join(OFFLOAD_DEVICES)}"
            )
        if options[option] == "nvme" and not options["nvme_path"]:
            raise ConfigError(
                f"trainer.deepspeed.{option}=nvme needs trainer.deepspeed.nvme_path (a fast local disk)"
            )
    if options["offload_params"] != "none" and stage != 3:
        raise ConfigError(
            "trainer.deepspeed.offload_params needs ZeRO-3 (trainer=deepspeed_zero3): only stage 3 "
            "partitions the parameters; offload_optimizer works with every stage"
        )
    if options["optimizer"] not in OPTIMIZERS:
        raise ConfigError(
            f"trainer.deepspeed.optimizer={options['optimizer']!r}: choose torch (AdamW, fused on GPU) "
            "or fused_adam (DeepSpeed's, GPU only)"
        )
    if options["optimizer"] == "fused_adam" and not cuda:
        raise ConfigError(
            "trainer.deepspeed.optimizer=fused_adam is a CUDA kernel; use trainer.deepspeed.optimizer=torch on CPU"
        )
    if options["optimizer"] == "fused_adam" and options["offload_optimizer"] != "none":
        raise ConfigError(
            "with trainer.deepspeed.offload_optimizer the optimizer step runs on the CPU (DeepSpeed's "
            "CPUAdam replaces ours): set trainer.deepspeed.optimizer=torch"
        )


def deepspeed_config(
    trainer: Mapping[str, Any], batch_size: int, accumulation: int, processes: int
) -> dict[str, Any]:
    """The DeepSpeed config for ``trainer`` (``configs/trainer/deepspeed_zero*.yaml``).

    bf16 is torch autocast inside the engine (fp32 weights and optimizer, bf16 compute, as
    without DeepSpeed); fp16 is DeepSpeed's own (fp16 weights, fp32 master copy, dynamic loss
    scaling), the only fp16 mode with a loss scaler under ZeRO.
    """
    options = trainer["deepspeed"]
    zero: dict[str, Any] = {"stage": options["zero_stage"]}
    if options["offload_optimizer"] != "none":
        zero["offload_optimizer"] = _offload(options["offload_optimizer"], options["nvme_path"])
    if options["offload_params"] != "none":
        zero["offload_param"] = _offload(options["offload_params"], options["nvme_path"])
    if options["zero_stage"] == 3:
        zero["stage3_param_persistence_threshold"] = options["param_persistence_threshold"]
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # weights come from the checkpoint
    config: dict[str, Any] = {
        "train_batch_size": batch_size * accumulation * processes,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": trainer["grad_clip"] or 0.0,
        "zero_optimization": zero,
        "steps_per_print": NEVER,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    if trainer["precision"] == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif trainer["precision"] == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0: dynamic
    return config


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    offload: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        offload["nvme_path"] = nvme_path
    return offload


def build_fused_adam(groups: list[dict], lr: float, betas: tuple[float, float], eps: float):
    """DeepSpeed's FusedAdam in AdamW mode (decoupled weight decay), our groups and hyperparameters."""
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adam_w_mode=True)


def vectorize_scalar_parameters(module: nn.Module) -> list[str]:
    """Replace every 0-d parameter of ``module`` by a 1-element vector; returns their names.

    DeepSpeed (0.19) broadcasts each parameter as ``p.data.view(torch.uint8)``, which torch
    refuses for a 0-d tensor (CLIP's learned temperature), when it builds its engine. A
    ``[1]`` tensor computes the same everywhere a ``[]`` one is used (broadcasting, ``.item()``,
    ``.exp()``). Call before the optimizer is built; :func:`consolidated_weights` gives the
    names back their 0-d shape, so saved weights load into models built without DeepSpeed.
    """
    names = []
    for module_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(owner, name, nn.Parameter(param.detach().reshape(1), param.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def consolidated_weights(checkpoint: str | Path, tag: str, scalars: list[str]) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (parameters and buffers) from a DeepSpeed checkpoint of any ZeRO
    stage, on the CPU: DeepSpeed's own ``zero_to_fp32`` merge of every rank's partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    report = io.StringIO()  # zero_to_fp32 prints its progress; kept for the debug log
    with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    log.debug("zero_to_fp32 on %s: %s", checkpoint, report.getvalue())
    for name in scalars:
        state[name] = state[name].reshape(())
    return {name: tensor.contiguous() for name, tensor in state.items()}
