"""DeepSpeed ZeRO through Accelerate: the DeepSpeed config built from our trainer config, and the
two things our models need around it (no 0-d parameters, consolidated fp32 weights).

The batch semantics stay ours: ``train_batch_size`` is ``trainer.global_batch_size``, split as
``data.batch_size`` per process and micro-batch x processes x accumulation, exactly as without
DeepSpeed (DeepSpeed divides each micro-batch's loss by the accumulation, as Accelerate does
otherwise). The optimizer is ours (AdamW, decay groups), and its learning rate and weight decay are
set each step from the step (DeepSpeed has no scheduler here). Gradient clipping and the skip of
a step whose gradient is not finite are DeepSpeed's (its ZeRO optimizers skip such a step in
every precision and report it through ``engine.was_step_applied()``).

A DeepSpeed JSON of the user's (``trainer.deepspeed.config``, or an Accelerate config's
``deepspeed_config_file``) is the DeepSpeed config instead (:func:`merged_deepspeed_config`): the
trainer config fills only what it leaves out and its ``"auto"`` values, and a value it sets that the
trainer config also decides (batch, accumulation, clipping, ZeRO stage, offload, precision) must
agree with it, or the run stops with one line naming both.

DeepSpeed's own optimizers are C++/CUDA ops it compiles at first use unless its install prebuilt
them: FusedAdam (``trainer.deepspeed.optimizer=fused_adam``) and CPUAdam (which Accelerate swaps in
for AdamW under ``offload_optimizer``). Where one cannot be built (:func:`op_unavailable`: no
ninja, no C++ compiler, no nvcc of torch's CUDA version) the run uses torch's AdamW instead, the
same update, and its log says what to install.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
CUDA_OPS = ("fused_adam",)  # DeepSpeed ops compiled with nvcc; the others are C++ (cpu_adam)
PREBUILD = {"fused_adam": "DS_BUILD_FUSED_ADAM=1", "cpu_adam": "DS_BUILD_CPU_ADAM=1"}


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
    if options["config"] is not None and not isinstance(options["config"], str):
        raise ConfigError(
            f"trainer.deepspeed.config={options['config']!r}: give the path of a DeepSpeed JSON file, or null"
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

    bf16 is torch autocast inside the engine (fp32 weights and optimizer, bf16 compute, gradients
    accumulated and averaged over the ranks in fp32: as without DeepSpeed); fp16 is DeepSpeed's own (fp16 weights, fp32 master copy, dynamic loss
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
        # No "lower precision safe modules": DeepSpeed would otherwise average the gradients of
        # every Linear and Conv weight over the ranks in bf16; the weights are float32 here, so
        # their gradients are too, and they are averaged (and accumulated) in float32, as by DDP.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        config["communication_data_type"] = "fp32"
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif trainer["precision"] == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0: dynamic
    if options["offload_optimizer"] != "none" and (reason := op_unavailable("cpu_adam")):
        # DeepSpeed then keeps our AdamW (torch's), stepping the offloaded fp32 weights on the CPU
        config["zero_force_ds_cpu_optimizer"] = False
        log.warning(
            "trainer.deepspeed.offload_optimizer=%s: DeepSpeed's CPUAdam cannot be built here (%s); the "
            "offloaded optimizer step runs torch's AdamW on the CPU instead (same update, slower). For CPUAdam: %s",
            options["offload_optimizer"], reason, _install_hint("cpu_adam"),
        )  # fmt: skip
    return config


# -- a DeepSpeed JSON of the user's ----------------------------------------------------------------

AUTO = "auto"  # a value the JSON leaves to the trainer config (Hugging Face's convention)
NOT_OURS = {  # sections of a DeepSpeed JSON that memetrain's own objects replace
    "optimizer": "memetrain builds the optimizer from trainer.optimizer, lr, betas, eps and weight_decay "
    "(trainer.deepspeed.optimizer: torch or fused_adam)",
    "scheduler": "memetrain sets the learning rate every step from trainer.lr, warmup_steps, min_lr and lr_schedule",
}


@dataclass(frozen=True)
class Decided:
    """A DeepSpeed setting the trainer config decides: a JSON that sets it must agree."""

    key: str  # dotted, in the DeepSpeed config: zero_optimization.stage
    value: Any
    option: str  # what in our config decides it


def decided_settings(
    trainer: Mapping[str, Any], batch_size: int, accumulation: int, processes: int
) -> list[Decided]:
    """The DeepSpeed settings the trainer config (and ``data.batch_size``) decide, with their values."""
    options, precision = trainer["deepspeed"], trainer["precision"]
    batch = "trainer.global_batch_size (= data.batch_size x processes x accumulation)"
    decided = [
        Decided("train_batch_size", batch_size * accumulation * processes, "trainer.global_batch_size"),
        Decided("train_micro_batch_size_per_gpu", batch_size, "data.batch_size"),
        Decided("gradient_accumulation_steps", accumulation, batch),
        Decided("gradient_clipping", trainer["grad_clip"] or 0.0, "trainer.grad_clip"),
        Decided("zero_optimization.stage", options["zero_stage"], "trainer=deepspeed_zero<stage>"),
        Decided("zero_optimization.offload_optimizer.device", options["offload_optimizer"], "trainer.deepspeed.offload_optimizer"),
        Decided("zero_optimization.offload_param.device", options["offload_params"], "trainer.deepspeed.offload_params"),
        # bf16 is torch autocast in the engine (fp32 weights); DeepSpeed's bf16 mode (bf16 weights) is never used
        Decided("bf16.enabled", False, "trainer.precision (bf16 is torch_autocast here, never DeepSpeed's bf16 weights)"),
        Decided("fp16.enabled", precision == "fp16", "trainer.precision"),
        Decided("torch_autocast.enabled", precision == "bf16", "trainer.precision"),
    ]  # fmt: skip
    if precision == "bf16":
        decided.append(Decided("torch_autocast.dtype", "bfloat16", "trainer.precision"))
    for option, key in (("offload_optimizer", "offload_optimizer"), ("offload_params", "offload_param")):
        if options[option] == "nvme":
            decided.append(
                Decided(
                    f"zero_optimization.{key}.nvme_path", options["nvme_path"], "trainer.deepspeed.nvme_path"
                )
            )
    if options["zero_stage"] == 3:
        decided.append(
            Decided(
                "zero_optimization.stage3_param_persistence_threshold",
                options["param_persistence_threshold"],
                "trainer.deepspeed.param_persistence_threshold",
            )
        )
    return decided


def read_deepspeed_json(path: str | Path, named: str) -> dict[str, Any]:
    """The DeepSpeed config in the JSON file ``path``; ``named`` says where it was given (errors)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(
            f"{named}: cannot read it ({err.strerror or err}); give the path of a DeepSpeed JSON"
        ) from None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{named} is not JSON ({err}); give a DeepSpeed config file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{named} holds a JSON {type(config).__name__}, not a DeepSpeed config (an object)")
    return config


def merged_deepspeed_config(
    given: Mapping[str, Any], named: str, ours: Mapping[str, Any], decided: list[Decided]
) -> dict[str, Any]:
    """``given`` (a DeepSpeed JSON of the user's, ``named`` in errors) as the DeepSpeed config: our
    config ``ours`` (:func:`deepspeed_config`) fills what it leaves out and its ``"auto"`` values, its
    other values stay, and every :class:`Decided` setting it gives must equal ours."""
    for section, why in NOT_OURS.items():
        if section in given:
            raise ConfigError(f"{named} has a {section!r} section, but {why}: remove it from the file")
    merged = copy.deepcopy(dict(given))
    _fill(merged, ours)
    if unfilled := _auto_keys(merged):
        raise ConfigError(
            f'{named}: {", ".join(unfilled)} is "auto", which memetrain does not fill (it fills the batch, '
            "accumulation, clipping, ZeRO stage, offload and precision settings): give a value in the file"
        )
    for setting in decided:
        value = _lookup(merged, setting.key)
        if value is not _ABSENT and not _same(value, setting.value):
            raise ConfigError(
                f"{named}: {setting.key}={json.dumps(value)} but {setting.option} gives {json.dumps(setting.value)}: "
                f"make them agree (change {setting.option.split(' ')[0]}, or set {setting.key} to "
                f'{json.dumps(setting.value)} or "auto" in the file)'
            )
    return merged


_ABSENT = object()
_DTYPES = {
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "torch.float16": "float16",
}


def _fill(target: dict[str, Any], ours: Mapping[str, Any]) -> None:
    for key, value in ours.items():
        if key not in target or target[key] == AUTO:
            target[key] = copy.deepcopy(value)
        elif isinstance(value, Mapping) and isinstance(target[key], dict):
            _fill(target[key], value)


def _auto_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        if value == AUTO:
            found.append(prefix + key)
        elif isinstance(value, Mapping):
            found += _auto_keys(value, f"{prefix}{key}.")
    return found


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _same(given: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(given, bool):
        return given is ours
    if isinstance(ours, (int, float)) and isinstance(given, (int, float)):
        return float(given) == float(ours)
    if isinstance(ours, str) and isinstance(given, str):
        return _DTYPES.get(given.lower(), given.lower()) == _DTYPES.get(ours.lower(), ours.lower())
    return given == ours


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    offload: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        offload["nvme_path"] = nvme_path
    return offload


def build_fused_adam(groups: list[dict], lr: float, betas: tuple[float, float], eps: float):
    """DeepSpeed's FusedAdam in AdamW mode (decoupled weight decay), our groups and hyperparameters;
    torch's fused AdamW (the same update) where FusedAdam cannot be built, with a log line."""
    if reason := op_unavailable("fused_adam"):
        log.warning(
            "trainer.deepspeed.optimizer=fused_adam: DeepSpeed's FusedAdam cannot be built here (%s); using "
            "torch's fused AdamW instead (the same update). For FusedAdam: %s",
            reason, _install_hint("fused_adam"),
        )  # fmt: skip
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adam_w_mode=True)


def op_unavailable(name: str) -> str | None:
    """Why DeepSpeed's op ``name`` (``fused_adam``, ``cpu_adam``) cannot be loaded here, or None.

    A prebuilt op loads; otherwise DeepSpeed compiles it at first use, which needs ninja, a C++
    compiler and, for a CUDA op, an nvcc whose CUDA version DeepSpeed accepts for torch's (its own
    check, run here before anything is built).
    """
    from deepspeed.git_version_info import installed_ops
    from torch.utils import cpp_extension

    if installed_ops.get(name):
        return None
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if name in CUDA_OPS:
        from deepspeed.ops.op_builder.builder import (
            CUDAMismatchException,
            MissingCUDAException,
            assert_no_cuda_mismatch,
            installed_cuda_version,
        )

        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        try:
            assert_no_cuda_mismatch(name)
        except MissingCUDAException:
            return f"no nvcc to compile it (CUDA_HOME={cpp_extension.CUDA_HOME})"
        except CUDAMismatchException:
            nvcc = ".".join(map(str, installed_cuda_version(name)))
            return f"nvcc is CUDA {nvcc} but torch is built for CUDA {torch.version.cuda}"
    return None


def _install_hint(name: str) -> str:
    needs = "ninja (pip install ninja) and a C++ compiler"
    if name in CUDA_OPS:
        needs += " and the CUDA toolkit (nvcc) of torch's CUDA version"
    return (
        f"install {needs} where the run starts, or reinstall DeepSpeed with the op built in on a machine that "
        f"has them ({PREBUILD[name]} pip install --force-reinstall --no-cache-dir deepspeed)"
    )


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


@contextlib.contextmanager
def edits_reach_master_copies(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Let in-place edits of ``parameters`` made inside (a method's after-step clamp) reach the
    float32 master copies DeepSpeed's ZeRO-1/2 optimizer keeps of them and steps from.

    ZeRO-1/2 update float32 master copies (each rank its partition) and copy them back into the
    model's weights after every step, so an edit of a weight alone is undone at the next step.
    Inside this context each parameter that has such a copy (``_hp_mapping``, what DeepSpeed's own
    ``safe_*_full_fp32_param`` look for) holds its full float32 value: the model's weight itself
    where that is float32 (it equals the copy after a step: no collective), else the copy gathered
    with ``deepspeed.utils.safe_get_full_fp32_param`` (one all-reduce of the parameter), so the
    edit is made in float32 also where the model is held in fp16. On leaving, the edited value goes
    to the master copy (``safe_set_full_fp32_param``, each rank its partition) and into the weight.
    Parameters without a copy (no DeepSpeed; ZeRO-3 refuses after-step edits) are edited as they are.
    Every rank must enter with the same parameters.
    """
    held = [p for p in parameters if hasattr(p, "_hp_mapping")]
    if not held:
        yield
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    lowered = {}  # id(parameter) -> its weight as the model holds it, where that is not float32
    for param in held:
        if param.dtype != torch.float32:
            lowered[id(param)] = param.data
            param.data = safe_get_full_fp32_param(param)
    yield
    for param in held:
        edited = param.detach()
        if id(param) in lowered:
            param.data = lowered[id(param)]
            param.data.copy_(edited)
        safe_set_full_fp32_param(param, edited)


def deepspeed_checkpoint_classes() -> list[type]:
    """The classes DeepSpeed (0.19) pickles into its checkpoint files beside tensors, dtypes and
    plain containers: its loss scalers (in every precision: a static one of scale 1 without
    fp16, the dynamic one with), the ZeRO stage enum and ZeRO-1/2's fragment addresses, all in the
    optimizer states. (The model states hold only tensors and plain values.) None of them runs
    anything when built from a pickle: their constructors and ``__dict__`` take plain values."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` of a DeepSpeed checkpoint file, with
    :func:`deepspeed_checkpoint_classes` allowed. Anything else a pickle names (a function to call,
    another class) is refused before it is built, as a :class:`pickle.UnpicklingError` that names
    the file and what it asked for."""
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{Path(path).name}: {_refusal(err)}") from None


def _refusal(err: pickle.UnpicklingError) -> str:
    """What a weights-only load refused, without torch's advice to load the file unsafely."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    found = [
        p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))
    ]
    return " ".join((found[0] if found else str(err)).split()).rstrip(".")


@contextlib.contextmanager
def weights_only_checkpoint_reads(engines: list[Any]) -> Iterator[None]:
    """Inside, every DeepSpeed engine among ``engines`` (``accelerator._models``) reads its
    checkpoint files with :func:`load_weights_only`: its checkpoint engine's own ``load`` (DeepSpeed's
    TorchCheckpointEngine passes ``weights_only=False``, so a file that names a function runs it)
    is shadowed for the duration. Every file DeepSpeed's ``load_checkpoint`` reads goes through it:
    the model states and, under ZeRO, each rank's optimizer partitions."""
    readers = [e.checkpoint_engine for e in engines if getattr(e, "checkpoint_engine", None) is not None]
    for reader in readers:
        reader.load = load_weights_only  # an instance attribute: the class's method stays as it is
    try:
        yield
    finally:
        for reader in readers:
            del reader.load


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
