"""What benchmarks/gpu_checks.py builds its checks from: the real engine (``build_accelerator``, the
method from the Hydra configs, ``build_optimizer``, ``Trainer.train_step``) on synthetic batches,
on a GPU at small realistic sizes or (``--cpu-smoke``) on the CPU, tiny."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # memetrain and tests.helpers from the checkout, installed or not

TOLERANCE = {"bf16": 0.05, "fp16": 0.02}  # |loss - fp32 loss| / fp32 loss at the first step
STEPS = 3
VOCAB, LENGTH = 1000, 16


class Skip(Exception):
    """The check cannot run here; its message says why."""


class Setup:
    """Where the checks run: a GPU at realistic small sizes, or (``--cpu-smoke``) the CPU, tiny."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.image_size, self.batch_size = (32, 4) if smoke else (64, 32)
        self.tmp = Path(tempfile.mkdtemp(prefix="memetrain-gpu-check-"))

    def need_cuda(self, what: str) -> None:
        if not self.cuda:
            raise Skip(f"{what} needs CUDA")


# -- building the engine ------------------------------------------------------------------------------


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def method_factory(setup: Setup, method: str, model: str, *overrides: str, info=None) -> Callable:
    """A function that builds ``method`` with ``model`` from the configs, seeded (the same weights
    each call), for data described by ``info`` (default: synthetic batches' vocabulary)."""
    from omegaconf import OmegaConf

    from memetrain.methods import DataInfo, build_method

    if setup.smoke and not any(o.startswith("model.image.name=") for o in overrides):
        overrides = (*overrides, "model.image.name=test_resnet")
    cfg = compose(f"method={method}", f"model={model}", f"data.image_size={setup.image_size}", *overrides)
    options = OmegaConf.to_container(cfg.method, resolve=True)
    options.pop("name"), options.pop("view")
    model_options = OmegaConf.to_container(cfg.model, resolve=True)

    def build():
        torch.manual_seed(0)
        return build_method(
            method, dict(options), model_options, info or DataInfo(["label"], "label", VOCAB, 0)
        )

    return build


def trainer_options(*overrides: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = compose(*overrides)
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def synthetic_batches(setup: Setup, views: bool) -> Iterator[dict[str, Any]]:
    """Random memes (the same sequence every time): images, or DINO's 2 global and 2 local crops."""
    generator = torch.Generator().manual_seed(1)
    size, batch = setup.image_size, setup.batch_size
    while True:
        tokens = torch.randint(1, VOCAB, (batch, LENGTH), generator=generator)
        item = {
            "input_ids": tokens,
            "attention_mask": torch.ones(batch, LENGTH, dtype=torch.long),
            "label": torch.randint(0, 2, (batch,), generator=generator),
            "valid": torch.ones(batch, dtype=torch.bool),
            "id": [f"m{i}" for i in range(batch)],
            "text": ["a meme caption"] * batch,
        }
        item["labels"] = item["label"][:, None]
        shape = [(size, size)] * 2 + [(size // 2, size // 2)] * 2 if views else [(size, size)]
        images = [
            torch.randint(0, 256, (batch, 3, *hw), dtype=torch.uint8, generator=generator) for hw in shape
        ]
        item |= {"views": images} if views else {"image": images[0]}
        yield item


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build_trainer(
    setup: Setup, factory: Callable, options: dict, views: bool, scaler_scale: float | None = None
):
    """The Trainer of ``factory()``'s method with ``options``; ``scaler_scale``: an fp16 run's initial
    loss scale. On CPU (``--cpu-smoke``) the Accelerator is built directly (build_accelerator
    refuses the GPU options there) and fp16 gets torch's CPU GradScaler, as it has a CUDA one on GPUs."""
    from accelerate import Accelerator

    from memetrain.engine.checkpoint import Checkpointer
    from memetrain.engine.distributed import build_accelerator
    from memetrain.engine.logger import RunLogger
    from memetrain.engine.model_options import apply_trainer_options
    from memetrain.engine.optim import build_optimizer
    from memetrain.engine.trainer import EarlyStopping, Trainer, TrainerSettings

    reset_accelerate()
    deepspeed = options["strategy"] == "deepspeed"
    if setup.cuda or deepspeed:
        accelerator = build_accelerator(options, setup.batch_size, 1)
    else:
        accelerator = Accelerator(cpu=True, mixed_precision=options["precision"])
    if options["precision"] == "fp16" and not deepspeed and (not setup.cuda or scaler_scale):
        accelerator.native_amp = True  # on CPU: what Accelerate has on a GPU with fp16
        scale = scaler_scale or 2.0**16
        accelerator.scaler = torch.amp.GradScaler(
            setup.device.type, init_scale=scale, backoff_factor=0.5 if scale <= 2**16 else 1 / scale
        )
    method = factory()
    scalars = apply_trainer_options(method, options, 1, processes=1, cuda=setup.cuda)
    optimizer = build_optimizer(method.param_groups(options["weight_decay"]), options, accelerator.device)
    model, optimizer = accelerator.prepare(method, optimizer)
    fields = {f: options[f] for f in TrainerSettings.__dataclass_fields__ if f in options}
    if isinstance(fields.get("early_stopping"), dict):
        fields["early_stopping"] = EarlyStopping(**fields["early_stopping"])
    run = setup.tmp / f"run{time.monotonic_ns()}"
    checkpointer = Checkpointer(run / "checkpoints", 1, accelerator, scalars)
    trainer = Trainer(
        TrainerSettings(**fields), accelerator, model, optimizer, None, checkpointer, "check: 1\n"
    )
    trainer.logger = RunLogger(run, True, 0)
    trainer.stream = synthetic_batches(setup, views)
    return trainer


def train(trainer, steps: int = STEPS) -> tuple[list[float], list[float]]:
    """``steps`` optimizer steps; the training loss of each and the seconds each took."""
    from memetrain.engine.trainer import _Window

    losses, seconds = [], []
    for _ in range(steps):
        window, start = _Window(), time.perf_counter()
        trainer.train_step(trainer.stream, window)
        losses.append(float(window.sums["loss"]) / window.count)
        if trainer.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return losses, seconds


def options_for(setup: Setup, strategy: str, precision: str, *overrides: str) -> dict[str, Any]:
    return trainer_options(
        f"trainer={strategy}", f"trainer.precision={precision}", f"trainer.max_steps={STEPS}",
        f"trainer.global_batch_size={setup.batch_size}", "trainer.warmup_steps=0", *overrides,
    )  # fmt: skip


def compare_precision(setup: Setup, method: str, model: str, precision: str, strategy: str = "single") -> str:
    """Figure of a precision check; raises AssertionError when the first loss is off."""
    factory = method_factory(setup, method, model)
    views = method == "dino"
    reference, _ = train(build_trainer(setup, factory, options_for(setup, strategy, "no"), views))
    trainer = build_trainer(setup, factory, options_for(setup, strategy, precision), views)
    losses, _ = train(trainer)
    error = abs(losses[0] - reference[0]) / abs(reference[0])
    shown = f"fp32 {fmt(reference)} vs {precision} {fmt(losses)}"
    figure = f"{shown}, first-step difference {error:.2%} (tolerance {TOLERANCE[precision]:.0%}), skipped steps {trainer.state.skipped_steps}"
    assert all(map(math.isfinite, losses)) and error <= TOLERANCE[precision], figure
    return figure


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
