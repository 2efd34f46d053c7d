"""The training loop: resume, then {step; log; validate; checkpoint} until ``max_steps``, then close.
On SIGTERM or SIGUSR2 (Slurm's preemption and time-limit signals) it checkpoints after the current
step and raises :class:`memetrain.errors.TrainingStopped` (see :mod:`memetrain.engine.stopping`).

Components (built by the caller): the Accelerate ``accelerator``, the ``method`` (model and loss),
the ``optimizer``, the training ``stream`` and an optional dev-split ``validation``
(:mod:`memetrain.eval.validation`, whose metric ``keep_best`` and early stopping watch), the
``logger`` and the ``checkpointer``. Checkpointed state: Accelerate's (model, optimizer, scaler, every RNG), the
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm

from memetrain.data.stream import MemeStream
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.distributed import broadcast_from_rank0, running_statistics
from memetrain.engine.logger import RunLogger
from memetrain.engine.optim import SCHEDULED_DECAY, Plateau, lr_at
from memetrain.engine.schedules import cosine
from memetrain.engine.stopping import StopSignals
from memetrain.engine.zero import edits_reach_master_copies
from memetrain.errors import ConfigError, MemetrainError, TrainingStopped
from memetrain.eval.validation import Validation, improves
from memetrain.losses.monitor import COLLAPSE_WARNING
from memetrain.methods import Method

log = logging.getLogger(__name__)


class TrainingError(MemetrainError):
    """Training cannot go on (losses that stay non-finite)."""


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after ``patience`` validations in a row without ``trainer.keep_best``'s metric
    improving by more than ``min_delta`` (None: never stop early)."""

    patience: int | None = None
    min_delta: float = 0.0


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
    lr_schedule: Mapping[str, Any] | None = None  # memetrain.engine.optim.lr_at's kinds; None: warmup_cosine
    keep_best: str | None = None
    early_stopping: EarlyStopping = dataclasses.field(default_factory=lambda: EarlyStopping())

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
        if isinstance(self.early_stopping, Mapping):  # trainer.early_stopping as configured
            object.__setattr__(self, "early_stopping", EarlyStopping(**self.early_stopping))
        patience = self.early_stopping.patience
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
        ):
            raise ConfigError(
                f"trainer.early_stopping.patience={patience!r}: give a whole number of at least 1, or null"
            )
        if patience is not None and self.keep_best is None:
            raise ConfigError(
                "trainer.early_stopping.patience needs trainer.keep_best=<metric>: the metric whose "
                "improvement it waits for (auroc for Hateful Memes, task_b_f1_weighted_macro for MAMI task B)"
            )


@dataclass
class TrainState:
    """Counters checkpointed beside the model (as JSON)."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    best_step: int | None = None  # where trainer.keep_best's metric was best on dev (that checkpoint is kept)
    best_value: float | None = None
    validations_since_best: int = 0  # early stopping's count, kept across a requeue
    stopped_early: bool = False
    plateau_best: float | None = None  # lr_schedule kind plateau: its metric's best, its count of
    plateau_bad: int = 0  # validations without improvement, and how often it lowered the rate
    lr_reductions: int = 0


def per_process_batch(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """``batch_size``, or the global batch split over the processes when ``batch_size`` on each
    of them would exceed it (``torchrun --nproc_per_node N`` with a one-process config)."""
    _check_batch_options(global_batch_size, batch_size)
    if batch_size * world_size > global_batch_size and global_batch_size % world_size == 0:
        return global_batch_size // world_size
    return batch_size


def accumulation_steps(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step, so the global batch is the same at any world size."""
    _check_batch_options(global_batch_size, batch_size)
    per_step = batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not a multiple of data.batch_size={batch_size} x "
            f"{world_size} processes = {per_step}; change one of them"
        )
    return global_batch_size // per_step


def _check_batch_options(global_batch_size: int, batch_size: int) -> None:
    for name, value in (("data.batch_size", batch_size), ("trainer.global_batch_size", global_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: give a whole number of at least 1")


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
        validation: Validation | None = None,
    ):
        self.s, self.accelerator, self.model, self.optimizer = settings, accelerator, model, optimizer
        # The prepared ``model`` may wrap the method (DDP, DeepSpeed, torch.compile). keep_torch_compile
        # would put the bare method into the compiled wrapper in place of the DDP module it wraps,
        # and every micro-batch would then all-reduce (no_sync lost) from the first step on.
        self.method: Method = accelerator.unwrap_model(model, keep_torch_compile=False)
        self.stream, self.validation, self.checkpointer = stream, validation, checkpointer
        if (settings.lr_schedule or {}).get("kind") == "plateau":
            Plateau.of(settings.lr_schedule)  # its options are checked before the first step
            if validation is None:
                raise ConfigError(
                    "trainer.lr_schedule kind plateau lowers the rate when a dev metric stops improving, but "
                    "this run validates nothing: give it a dev split (data.dev_split or data.dev_from_train)"
                )
        self.config_yaml = config_yaml
        # Which groups follow the decay schedule, read before a resume replaces the groups with the
        # checkpoint's (older checkpoints lack the key); a group's current decay says nothing: a
        # schedule may start at 0.
        self.scheduled_decay = [bool(group.get(SCHEDULED_DECAY)) for group in optimizer.param_groups]
        self.accum = accelerator.gradient_accumulation_steps
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.state = TrainState()
        self.logger: RunLogger | None = None
        # the newest checkpoint saved or resumed from: what the weights are
        self.checkpoint: Path | None = None

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, logger_factory, start: Path | None = None) -> TrainState:
        """Train to ``max_steps`` from checkpoint ``start`` (None: this run's newest, if any);
        returns the state."""
        self.resume(start or self.checkpointer.latest())
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
            while self.state.step < self.s.max_steps and not self.state.stopped_early:
                self.train_step(batches, window)
                progress.update(1)
                step = self.state.step
                last = step == self.s.max_steps
                if step % self.s.log_every == 0 or last:
                    self._log(window, progress)
                    window = _Window()
                best = False
                if self.validation is not None and (step % self.s.val_every == 0 or last):
                    best = self._validate()
                saved = step % self.s.checkpoint_every == 0 or last or best or self.state.stopped_early
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
        step_loss, applied = None, False
        for micro in range(self.accum):
            start = time.perf_counter()
            batch = to_device(next(batches), acc.device)
            window.data_seconds += time.perf_counter() - start
            if self.state.step == 0 and micro == 0:
                self._log_inputs(batch)
            with acc.accumulate(self.model), acc.autocast():
                losses, report = self.model(batch)  # Method.forward = training_step, through DDP/DeepSpeed
                loss = sum(value for name, value in losses.items() if name.endswith("_loss"))
                acc.backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                grad_norm = None
                if acc.sync_gradients:
                    grad_norm = self._grad_norm()
                    applied = self._optimizer_step(step_loss, grad_norm)
            window.add(losses, report, grad_norm, len(batch["id"]))
        if applied:  # after_step (EMA, clamps) follows real optimizer steps only
            self.state.consecutive_nonfinite = 0
            # under DeepSpeed ZeRO-1/2 an in-place edit must also reach the optimizer's master copy
            with edits_reach_master_copies(method.edited_after_step() if self.deepspeed else []):
                method.after_step(self.state.step, self.s.max_steps)
        self.state.step += 1
        self.state.samples += self.s.global_batch_size

    def _grad_norm(self) -> torch.Tensor | float | None:
        """The step's gradient norm, also without clipping (an inf gradient must not step): one
        process and DDP clip here; DeepSpeed has clipped and stepped in the backward already, and its
        norm is read from the engine as it is (Accelerate's ``clip_grad_norm_`` would turn it into a
        number: a host sync every step)."""
        if self.deepspeed:
            return self.model.get_global_grad_norm()
        if type(self.method).clip_gradients is not Method.clip_gradients:  # its paper's own clipping
            self.accelerator.unscale_gradients()  # fp16: the true gradients, as clip_grad_norm_ does
            return self.method.clip_gradients(self.s.grad_clip)
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.s.grad_clip or math.inf)

    def _optimizer_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> bool:
        """Step the optimizer unless the loss or gradient is not finite; returns whether the
        weights moved. Under fp16 the loss scaler skips a step whose scaled gradient overflowed
        (Accelerate's GradScaler, DeepSpeed's dynamic loss scale), and lowers its scale: such a
        step is counted as skipped too, but not as non-finite (dynamic loss scaling overflows now
        and then by design) unless the scale was already at most 1, where the gradient itself is
        not finite."""
        acc = self.accelerator
        finite = self._finite(loss, grad_norm)
        if self.deepspeed:  # DeepSpeed has stepped in the backward unless its gradient was not finite
            applied = self.model.was_step_applied()
            if finite and not applied:
                if self.s.precision == "fp16":
                    self._skipped_overflow(None)
                else:
                    self._skipped_nonfinite()
            return applied
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if acc.scaler is not None:  # fp16: once unscaled, the scaler needs an update()
                acc.scaler.update(acc.scaler.get_scale())
            return False
        scale = acc.scaler.get_scale() if acc.scaler is not None else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The scaler lowers its scale exactly when it skipped the step. (Accelerate's
        # optimizer.step_was_skipped misses the skips of fused optimizers such as fused AdamW, our
        # default on CUDA, which GradScaler steps anyway and which skip the update inside.)
        if scale is not None and acc.scaler.get_scale() < scale:
            if scale <= 1:
                self._skipped_nonfinite()
            else:
                self._skipped_overflow(scale)
            return False
        return True

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> bool:
        """The step's one check, its one host sync and, with several processes, its one collective:
        flags, maxed over the ranks so that every rank decides alike, for a loss that is not finite
        on some rank, a gradient norm that is not (judged here without fp16 loss scaling, whose
        scaler handles overflowing gradients itself, and without DeepSpeed, which skips such a step
        itself), and a stop signal received on some rank (handed to the installed
        :class:`StopSignals`, whose ``agreed`` then needs no collective of its own). A non-finite
        loss or gradient is counted (:meth:`_skipped_nonfinite`)."""
        stop = StopSignals.installed()
        flags = torch.zeros(3, device=loss.device)  # [loss not finite, gradient not finite, signal]
        flags[0] = ~torch.isfinite(loss).all()
        if grad_norm is not None and self.s.precision != "fp16" and not self.deepspeed:
            flags[1] = ~torch.isfinite(torch.as_tensor(grad_norm)).all()
        if stop is not None and stop.received is not None:
            flags[2] = 1
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX)
        packed = int((flags[0] + 2 * flags[1] + 4 * flags[2]).item())  # the host sync
        if stop is not None:
            stop.vote(bool(packed & 4))
        if packed & 3 == 0:
            return True
        self._skipped_nonfinite()
        return False

    def _skipped_nonfinite(self) -> None:
        """Count a step skipped for a non-finite loss or gradient; too many in a row stop the run."""
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

    def _skipped_overflow(self, scale: float | None) -> None:
        """Count a step the fp16 loss scaler skipped because its scaled gradient overflowed."""
        self.state.skipped_steps += 1
        at = "" if scale is None else f" at loss scale {scale:g}"
        log.info(
            "step %d: the fp16 gradient overflowed%s; step skipped, loss scale lowered", self.state.step, at
        )

    def _broadcast_buffers(self) -> None:
        """Every rank takes rank 0's batch-norm statistics, which are the saved ones, in one
        broadcast (:func:`running_statistics`: only buffers each rank updates from its own
        batches). In training mode batch norm normalises with the batch's statistics and only
        updates the running ones, so ranks may differ in them while they train: they are made
        equal where they are read, before validation and evaluation and after training. (DDP
        broadcasts every buffer before each forward; DeepSpeed never does: ZeRO saves rank 0's.)"""
        if self.accelerator.num_processes > 1:
            broadcast_from_rank0(running_statistics(self.method))

    def _set_schedules(self) -> None:
        step, s = self.state.step, self.s
        schedule = {
            "lr": s.lr,
            "min_lr": s.min_lr,
            "warmup_steps": s.warmup_steps,
            "lr_schedule": s.lr_schedule,
        }
        lr = lr_at(step, s.max_steps, schedule, self.state.lr_reductions)
        weight_decay = cosine(step, s.max_steps, s.weight_decay, s.weight_decay_end)
        for group, scheduled in zip(self.optimizer.param_groups, self.scheduled_decay, strict=True):
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if scheduled:
                group["weight_decay"] = weight_decay

    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.stream

    # -- state -----------------------------------------------------------------------------------

    def save(self) -> None:
        state = {"train": dataclasses.asdict(self.state), "stream": self.stream.state_dict()}
        self.checkpoint = self.checkpointer.save(
            self.state.step, state, self.config_yaml, keep_also=self.state.best_step
        )

    def load_best(self) -> Path:
        """Load the weights of the best checkpoint on dev (``trainer.keep_best``) for evaluation."""
        if self.state.best_step is None:
            raise ConfigError(
                "eval.checkpoint=best but no checkpoint was chosen on dev: set trainer.keep_best=<metric> "
                "(and give the data a dev_split), or evaluate eval.checkpoint=last"
            )
        self.checkpoint = self.checkpointer.step_path(self.state.best_step)
        self.checkpointer.load(self.checkpoint)
        self._broadcast_buffers()
        return self.checkpoint

    def resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        state = self.checkpointer.load(checkpoint)
        self.state = TrainState(**state["train"])
        self.stream.load_state_dict(state["stream"])
        self.checkpoint = Path(checkpoint)
        if self.accelerator.is_main_process:
            log.info("resumed from %s (step %d)", checkpoint, self.state.step)

    # -- reporting -------------------------------------------------------------------------------

    def _log(self, window: _Window, progress: tqdm) -> None:
        acc = self.accelerator
        # every running sum (the same names on every rank) and the last gradient norm: one
        # all-reduce and one host sync per log line
        names = list(window.sums)
        means = [
            torch.as_tensor(window.sums[name], device=acc.device).float() / window.count for name in names
        ]
        if window.grad_norm is not None:
            means.append(torch.as_tensor(window.grad_norm, device=acc.device).float())
        means = torch.stack([mean.reshape(()) for mean in means])  # one-element values ([1]) too
        if acc.num_processes > 1:
            torch.distributed.all_reduce(means)
            means /= acc.num_processes
        reduced = means.tolist()
        values = {f"train/{name}": value for name, value in zip(names, reduced)}
        values["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if window.grad_norm is not None:
            values["train/grad_norm"] = reduced[-1]  # the same on every rank
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

    def _validate(self) -> bool:
        """Log the dev metrics; with ``keep_best``, track the best and early stopping's count.
        Returns whether this step is the new best (its checkpoint is then saved and kept)."""
        self._broadcast_buffers()
        metrics = self.validation(self.method, self.accelerator)
        self.logger.scalars(self.state.step, {f"val/{k}": v for k, v in metrics.items()})
        self._lower_rate_on_plateau(metrics)
        metric, state = self.s.keep_best, self.state
        if metric is None:
            return False
        if metric not in metrics:
            raise ConfigError(
                f"trainer.keep_best={metric}: validation of {self.method.name} reports "
                f"{', '.join(sorted(metrics))}; choose one of them"
            )
        if improves(metric, metrics[metric], state.best_value, self.s.early_stopping.min_delta):
            state.best_step, state.best_value, state.validations_since_best = state.step, metrics[metric], 0
            return True
        state.validations_since_best += 1
        patience = self.s.early_stopping.patience
        if patience is not None and state.validations_since_best >= patience:
            state.stopped_early = True
            if self.accelerator.is_main_process:
                log.info(
                    "step %d: dev %s has not improved on %.4f (step %d) for %d validations: stopping early",
                    state.step, metric, state.best_value, state.best_step, patience,
                )  # fmt: skip
        return False

    def _lower_rate_on_plateau(self, metrics: dict[str, float]) -> None:
        """``lr_schedule`` kind ``plateau``: count this validation in; the next step's rate is lower
        once the metric has stopped improving (every rank has the same metrics, so the same rate)."""
        if (self.s.lr_schedule or {}).get("kind") != "plateau":
            return
        plateau, state = Plateau.of(self.s.lr_schedule), self.state
        if plateau.metric not in metrics:
            raise ConfigError(
                f"trainer.lr_schedule.metric={plateau.metric}: validation of {self.method.name} reports "
                f"{', '.join(sorted(metrics))}; choose one of them"
            )
        state.plateau_best, state.plateau_bad, lower = plateau.update(
            metrics[plateau.metric], state.plateau_best, state.plateau_bad
        )
        if lower:
            state.lr_reductions += 1
            if self.accelerator.is_main_process:
                log.info(
                    "step %d: dev %s has not improved on %.4f for %d validations: learning rate x %g (%d times)",
                    state.step, plateau.metric, state.plateau_best, plateau.patience + 1, plateau.factor,
                    state.lr_reductions,
                )  # fmt: skip

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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
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
