"""The training loop: resume, then {step; log; validate; checkpoint} until ``max_steps``, then close.
On SIGTERM or SIGUSR2 (Slurm's preemption and time-limit signals) it checkpoints after the current
step and raises :class:`memetrain.errors.TrainingStopped` (see :mod:`memetrain.engine.stopping`).

Components (built by the caller): the Accelerate ``accelerator``, the ``method`` (model and loss),
the ``optimizer``, the training ``stream`` and an optional validation stream, the ``logger`` and the
``checkpointer``. Checkpointed state: Accelerate's (model, optimizer, scaler, every RNG), the
stream's position and :class:`TrainState`. The learning rate and weight decay are pure functions of
the step (``memetrain.engine.schedules``), so the step is the only schedule state. The same loop
runs one process, DDP and DeepSpeed (whose engine steps inside ``accelerator.backward`` on the
last micro-batch, clipping and skipping non-finite gradients itself).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm

from memetrain.data.stream import MemeStream
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.logger import RunLogger
from memetrain.engine.schedules import cosine, warmup_cosine
from memetrain.engine.stopping import StopSignals
from memetrain.errors import ConfigError, MemetrainError, TrainingStopped
from memetrain.losses.monitor import COLLAPSE_WARNING
from memetrain.methods import Method

log = logging.getLogger(__name__)


class TrainingError(MemetrainError):
    """Training cannot go on (losses that stay non-finite)."""


@dataclass(frozen=True)
class TrainerSettings:
    """Optimisation and bookkeeping; ``configs/trainer/*.yaml`` documents every field."""

    max_steps: int
    global_batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float | None
    precision: str
    log_every: int
    val_every: int
    checkpoint_every: int
    keep_checkpoints: int
    max_nonfinite_steps: int

    def __post_init__(self) -> None:
        """A value of the wrong type or out of range names its option (not a TypeError mid-run)."""
        least = {"max_steps": 0, "warmup_steps": 0, "max_nonfinite_steps": 0}
        for name in ("max_steps", "global_batch_size", "warmup_steps", "log_every", "val_every",
                     "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):  # fmt: skip
            value, minimum = getattr(self, name), least.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"trainer.{name}={value!r}: give a whole number of at least {minimum}")
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "eps", "grad_clip"):
            value = getattr(self, name)
            if value is None and name == "grad_clip":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"trainer.{name}={value!r}: give a number of at least 0")


@dataclass
class TrainState:
    """Counters checkpointed beside the model (as JSON)."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


def accumulation_steps(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step, so the global batch is the same at any world size."""
    for name, value in (("data.batch_size", batch_size), ("trainer.global_batch_size", global_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: give a whole number of at least 1")
    per_step = batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not a multiple of data.batch_size={batch_size} x "
            f"{world_size} processes = {per_step}; change one of them"
        )
    return global_batch_size // per_step


class Trainer:
    def __init__(
        self,
        settings: TrainerSettings,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        stream: MemeStream,
        checkpointer: Checkpointer,
        config_yaml: str,
        val_stream: MemeStream | None = None,
    ):
        self.s, self.accelerator, self.model, self.optimizer = settings, accelerator, model, optimizer
        self.method: Method = accelerator.unwrap_model(model)  # the prepared ``model`` may wrap it
        self.stream, self.val_stream, self.checkpointer = stream, val_stream, checkpointer
        self.config_yaml = config_yaml
        self.accum = accelerator.gradient_accumulation_steps
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.state = TrainState()
        self.logger: RunLogger | None = None

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, logger_factory) -> TrainState:
        """Train to ``max_steps`` (resuming from the newest checkpoint, if any); returns the state."""
        self.resume()
        self.logger = logger_factory(self.state.step)
        progress = tqdm(
            total=self.s.max_steps,
            initial=self.state.step,
            desc=f"train {self.method.name}",
            unit="step",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        batches = self._batches()
        window = _Window()
        stop = StopSignals().install()  # SIGTERM / SIGUSR2: checkpoint after the current step, then stop
        try:
            while self.state.step < self.s.max_steps:
                self.train_step(batches, window)
                progress.update(1)
                step = self.state.step
                if step % self.s.log_every == 0 or step == self.s.max_steps:
                    self._log(window, progress)
                    window = _Window()
                if self.val_stream is not None and (step % self.s.val_every == 0 or step == self.s.max_steps):
                    self._log_validation()
                saved = step % self.s.checkpoint_every == 0 or step == self.s.max_steps
                if saved:
                    self.save()
                if signal_name := stop.agreed(self.accelerator):
                    self._stop(signal_name, saved)
        except BaseException:
            self.logger.close()  # the events so far reach TensorBoard whatever ends the process
            raise
        finally:
            stop.restore()
            progress.close()
        self._broadcast_buffers()  # evaluation after training sees the saved buffers on every rank
        return self.state

    def _stop(self, signal_name: str, saved: bool) -> None:
        if not saved:
            self.save()
        self.logger.close()
        latest = self.checkpointer.latest()
        if self.accelerator.is_main_process:
            log.warning("%s: saved %s; stopping (the same command resumes from it)", signal_name, latest)
        raise TrainingStopped(signal_name, self.state.step, str(latest))

    def train_step(self, batches: Iterator[dict[str, Any]], window: _Window) -> None:
        """One optimizer step over ``accum`` micro-batches; skipped if the loss or gradient is not finite."""
        acc, method = self.accelerator, self.method
        self._set_schedules()
        method.before_step(self.state.step, self.s.max_steps)
        step_loss = None
        for micro in range(self.accum):
            start = time.perf_counter()
            batch = _to_device(next(batches), acc.device)
            window.data_seconds += time.perf_counter() - start
            if self.state.step == 0 and micro == 0:
                self._log_inputs(batch)
            if self.deepspeed:
                self._broadcast_buffers()  # what DDP does before each forward
            with acc.accumulate(self.model), acc.autocast():
                losses, report = self.model(batch)  # Method.forward = training_step, through DDP/DeepSpeed
                loss = sum(value for name, value in losses.items() if name.endswith("_loss"))
                acc.backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                grad_norm = None
                if acc.sync_gradients:  # the norm also without clipping: an inf gradient must not step
                    # DDP: clips here; DeepSpeed: already clipped and stepped, this is its norm
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.s.grad_clip or math.inf)
                if acc.sync_gradients and not self._finite(step_loss, grad_norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    if acc.scaler is not None:  # fp16: once unscaled, the scaler needs an update()
                        acc.scaler.update(acc.scaler.get_scale())
                else:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            window.add(losses, report, grad_norm, len(batch["id"]))
        if self.state.consecutive_nonfinite == 0:
            method.after_step(self.state.step, self.s.max_steps)
        self.state.step += 1
        self.state.samples += self.s.global_batch_size

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> bool:
        """Host sync once per optimizer step: the loss summed over ranks (so every rank decides
        alike) and, without fp16 loss scaling (whose scaler handles overflowing gradients itself),
        the gradient norm must be finite; under DeepSpeed, which has already stepped, the step
        must have been applied (its ZeRO optimizers skip non-finite gradients)."""
        acc = self.accelerator
        if acc.num_processes > 1:
            loss = acc.reduce(loss.clone(), "sum")
        scaled = self.s.precision == "fp16"
        values = [loss] if grad_norm is None or scaled else [loss, torch.as_tensor(grad_norm)]
        finite = all(torch.isfinite(value).all() for value in values)
        if self.deepspeed and not scaled:
            finite = finite and self.model.was_step_applied()
        if finite:
            self.state.consecutive_nonfinite = 0
            return True
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1
        log.warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row)",
            self.state.step,
            self.state.consecutive_nonfinite,
        )
        if self.state.consecutive_nonfinite > self.s.max_nonfinite_steps:
            raise TrainingError(
                f"the loss or gradient was not finite for {self.state.consecutive_nonfinite} steps in a row "
                f"(last at step {self.state.step}); lower trainer.lr, raise trainer.warmup_steps, prefer "
                "precision=bf16 over fp16, or check the data"
            )
        return False

    def _broadcast_buffers(self) -> None:
        """Every rank takes rank 0's buffers (batch-norm statistics), which are the saved ones: DDP
        does so before each forward, DeepSpeed never, and each rank updates them from its own
        batches; without this, ranks would evaluate (and resume) with statistics of their own."""
        if self.accelerator.num_processes > 1:
            for buffer in self.method.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def _set_schedules(self) -> None:
        step, s = self.state.step, self.s
        lr = warmup_cosine(step, s.max_steps, s.warmup_steps, s.lr, s.min_lr)
        weight_decay = cosine(step, s.max_steps, s.weight_decay, s.weight_decay_end)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("weight_decay", 0.0) > 0:
                group["weight_decay"] = weight_decay

    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.stream

    # -- state -----------------------------------------------------------------------------------

    def save(self) -> None:
        state = {"train": dataclasses.asdict(self.state), "stream": self.stream.state_dict()}
        self.checkpointer.save(self.state.step, state, self.config_yaml)

    def resume(self) -> None:
        latest = self.checkpointer.latest()
        if latest is None:
            return
        state = self.checkpointer.load(latest)
        self.state = TrainState(**state["train"])
        self.stream.load_state_dict(state["stream"])
        if self.accelerator.is_main_process:
            log.info("resumed from %s (step %d)", latest, self.state.step)

    # -- reporting -------------------------------------------------------------------------------

    def _log(self, window: _Window, progress: tqdm) -> None:
        acc = self.accelerator
        values = {
            f"train/{name}": acc.reduce(total, "mean").item() / window.count
            for name, total in window.sums.items()
        }
        values["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if window.grad_norm is not None:
            values["train/grad_norm"] = float(window.grad_norm)
        seconds = time.perf_counter() - window.start
        values["perf/samples_per_second"] = window.samples * acc.num_processes / seconds
        values["perf/data_wait_fraction"] = window.data_seconds / seconds
        values["perf/memory_gb"] = _memory_gb(acc.device)
        values["train/skipped_steps"] = self.state.skipped_steps
        for name, value in values.items():
            if name.startswith("train/embedding_std") and value < COLLAPSE_WARNING:
                log.warning(
                    "step %d: %s = %.3f (1 = spread, 0 = collapsed): the embeddings are collapsing",
                    self.state.step, name, value,
                )  # fmt: skip
        self.logger.scalars(self.state.step, values)
        progress.set_postfix(loss=f"{values.get('train/loss', float('nan')):.4f}", refresh=False)

    def _log_validation(self) -> None:
        self.logger.scalars(self.state.step, {f"val/{k}": v for k, v in self.validate().items()})

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean of the method's validation metrics over the validation split (all ranks)."""
        acc, method = self.accelerator, self.method
        self._broadcast_buffers()
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=acc.device)
        try:
            for batch in self.val_stream:
                batch = _to_device(batch, acc.device)
                weight = batch["valid"].sum()
                with acc.autocast():
                    metrics = method.validation_step(batch)
                losses = [value for name, value in metrics.items() if name.endswith("_loss")]
                if losses:
                    metrics["loss"] = sum(losses)
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0) + value.detach().float() * weight
                count += weight
        finally:
            self.model.train()
        count = acc.reduce(count, "sum")
        return {name: (acc.reduce(total, "sum") / count).item() for name, total in sums.items()}

    def _log_inputs(self, batch: dict[str, Any]) -> None:
        """The first training images (or first view) in TensorBoard: what the model really sees."""
        images = batch["image"] if "image" in batch else batch.get("views", [None])[0]
        if images is not None:
            self.logger.image_grid("inputs/train", images[:32].cpu())
            self.logger.text("inputs/train_text", "\n\n".join(batch["text"][:8]))


class _Window:
    """Running sums between two log lines, kept on the device (no host sync per step)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.samples = 0
        self.data_seconds = 0.0
        self.grad_norm: torch.Tensor | None = None

    def add(self, losses: dict, report: dict, grad_norm: torch.Tensor | None, samples: int) -> None:
        total = sum(value.detach() for name, value in losses.items() if name.endswith("_loss"))
        for name, value in {"loss": total, **losses, **report}.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.count += 1
        self.samples += samples
        if grad_norm is not None:
            self.grad_norm = grad_norm


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors, and lists of tensors (multi-view images), moved to ``device``; the rest as is."""
    non_blocking = device.type == "cuda"

    def move(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, list) and value and torch.is_tensor(value[0]):
            return [item.to(device, non_blocking=non_blocking) for item in value]
        return value

    return {name: move(value) for name, value in batch.items()}


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, KiB on Linux
