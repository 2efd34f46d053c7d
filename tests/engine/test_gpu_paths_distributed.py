"""What the GPU paths do to a multi-process run, checked in real processes on CPU (gloo, 2 ranks):

- CLIP's after-step clamp of its learned temperature reaches DeepSpeed ZeRO-1/2's float32 master
  copy, so the weights the next step produces start from the bound;
- torch's SyncBatchNorm refuses CPU tensors (why trainer.sync_batchnorm is GPU-only);
- trainer.compile under DDP keeps no_sync working: one gradient all-reduce per optimizer step with
  gradient accumulation, not one per micro-batch;
- a training step adds one collective and one host sync to what DDP or DeepSpeed do themselves
  (the finiteness of loss and gradient and the stop-signal agreement in one all-reduce);
- under DeepSpeed, batch-norm statistics are not broadcast while training, and in one broadcast
  where they are read;
- evaluation of a method trained by DeepSpeed in bf16 runs in bf16, the encoders once per batch;
- ZeRO-2 under bf16 autocast averages the gradients over the ranks in float32, as DDP does;

Every scenario runs in one torchrun launch of this file (``python -m torch.distributed.run
--nproc_per_node 2 tests/engine/test_gpu_paths_distributed.py OUT SCENARIO...``), which writes
``OUT/<scenario>.json`` from rank 0; the tests read those. Scenarios without DeepSpeed run first (a
DeepSpeed Accelerator marks the process as DeepSpeed's for good).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from memetrain.methods.base import Method
from tests.helpers import REPO, torchrun

SCRIPT = Path(__file__).resolve()
BOUND = 20.0  # CLIP's max_logit_scale in the clamp scenarios (its init too: every push goes past it)
PUSH_LR = 0.05  # Adam moves the pushed log scale by about this much per step


# -- the scenarios (run under torchrun) -------------------------------------------------------------


def _trainer_options(name: str, steps: int, *overrides: str) -> dict[str, Any]:
    from tests.engine.training_cases_script import trainer_config

    case = {
        "method": "clip",
        "trainer": name,
        "steps": steps,
        "global_batch": 8,
        "overrides": list(overrides),
    }
    return trainer_config(case)


def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _trainer(options: dict, method, out: Path, batch_size: int = 4):
    """The real engine around ``method``: Accelerator, optimizer, Trainer on the fixed batches."""
    from accelerate.utils import set_seed

    from memetrain.engine.checkpoint import Checkpointer
    from memetrain.engine.distributed import build_accelerator, world_size
    from memetrain.engine.model_options import apply_trainer_options
    from memetrain.engine.optim import build_optimizer
    from memetrain.engine.trainer import EarlyStopping, Trainer, TrainerSettings, accumulation_steps
    from tests.engine.training_cases_script import FixedBatches

    accumulation = accumulation_steps(options["global_batch_size"], batch_size, world_size())
    accelerator = build_accelerator(options, batch_size, accumulation)
    set_seed(0)
    method = method()
    scalars = apply_trainer_options(method, options, 1)
    optimizer = build_optimizer(method.param_groups(options["weight_decay"]), options, accelerator.device)
    model, optimizer = accelerator.prepare(method, optimizer)
    checkpointer = Checkpointer(out / "checkpoints", options["keep_checkpoints"], accelerator, scalars)
    fields = {f: options[f] for f in TrainerSettings.__dataclass_fields__} | {
        "early_stopping": EarlyStopping(**options["early_stopping"])
    }
    settings = TrainerSettings(**fields)
    stream = FixedBatches(batch_size, accumulation, accelerator.process_index, accelerator.num_processes)
    return Trainer(settings, accelerator, model, optimizer, stream, checkpointer, "case: 1\n")


def _fit(trainer, out: Path):
    from memetrain.engine.logger import RunLogger

    state = trainer.fit(lambda step: RunLogger(out, trainer.accelerator.is_main_process, step))
    trainer.logger.close()
    return state


def sync_batchnorm_on_cpu(out: Path) -> dict[str, Any]:
    """torch's SyncBatchNorm in a 2-rank gloo group on CPU: what its training forward says."""
    from torch import nn

    from memetrain.engine.distributed import build_accelerator

    build_accelerator(_trainer_options("ddp", 1), 4, 1)
    norm = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3))).train()
    try:
        norm(torch.randn(4, 3))
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


class LinearMethod(Method):
    """A linear classifier of the raw pixels: a method torch.compile takes in a second."""

    name = "linear"

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 1)

    def training_step(self, batch):
        logits = self.layer(self.embed(batch)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())
        return {"cls_loss": loss}, {}

    def embed(self, batch):
        return batch["image"].float().flatten(1) / 255


class BatchNormMethod(LinearMethod):
    """A batch norm over the images' channel means before the linear classifier."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)
        self.layer = torch.nn.Linear(3, 1)

    def embed(self, batch):
        return self.norm(batch["image"].float().mean(dim=(2, 3)) / 255)


def compiled_accumulation(out: Path) -> dict[str, Any]:
    """trainer.compile under DDP with 2 micro-batches per step: gradient all-reduces in 3 steps,
    counted by a DDP communication hook. The Accelerator is built directly (build_accelerator
    refuses compile on CPU), with the aot_eager backend: what matters is the compiled wrapper
    around DDP, not the generated kernels."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from memetrain.engine.checkpoint import Checkpointer
    from memetrain.engine.trainer import EarlyStopping, Trainer, TrainerSettings
    from tests.engine.training_cases_script import FixedBatches

    options = _trainer_options("ddp", 3, "trainer.checkpoint_every=100")
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=2,
        dynamo_backend="aot_eager",
        kwargs_handlers=[DistributedDataParallelKwargs(**options["ddp"])],
    )
    torch.manual_seed(0)
    method = LinearMethod()
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(method, optimizer)
    ddp = model._orig_mod
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    fields = {f: options[f] for f in TrainerSettings.__dataclass_fields__}
    settings = TrainerSettings(**(fields | {"early_stopping": EarlyStopping(**options["early_stopping"])}))
    checkpointer = Checkpointer(out / "compiled" / "checkpoints", 1, accelerator)
    stream = FixedBatches(2, 2, accelerator.process_index, accelerator.num_processes)
    trainer = Trainer(settings, accelerator, model, optimizer, stream, checkpointer, "case: 1\n")
    state = _fit(trainer, out / "compiled")
    wrapped = type(model._orig_mod).__name__
    accelerator.free_memory()
    return {"steps": state.step, "allreduces": len(calls), "compiled_wraps": wrapped}


def _counts(profiler) -> dict[str, Any]:
    """Collectives (torch.distributed's c10d ops, whatever the backend) and host syncs (tensor to
    Python number: ``aten::_local_scalar_dense``, what ``item()`` and ``bool()`` run) that torch's
    profiler recorded."""
    names = [event.name for event in profiler.events()]
    collectives = sorted(name for name in names if name.startswith("c10d::"))
    return {
        "collectives": len(collectives),
        "host_syncs": names.count("aten::_local_scalar_dense"),
        "names": collectives,
    }


def per_step_collectives(out: Path, name: str) -> dict[str, Any]:
    """A step of the trainer (the 4th: DDP has rebuilt its buckets; not a log step) and the signal
    agreement after it, against the same step written by hand (forward, backward, step for each
    micro-batch, in Accelerate's accumulate) in the same engine, 2 micro-batches per step."""
    from torch.profiler import ProfilerActivity, profile

    options = _trainer_options(name, 5, "trainer.checkpoint_every=100")
    trainer = _trainer(options, LinearMethod, out / name, batch_size=2)
    acc, model, optimizer = trainer.accelerator, trainer.model, trainer.optimizer
    counted: dict[str, Any] = {}
    original = trainer.train_step
    step_profiler = None

    def train_step(batches, window):
        nonlocal step_profiler
        if trainer.state.step == 4:  # the end of step 3, its stop-signal agreement included
            step_profiler.__exit__(None, None, None)
            counted["trainer"] = _counts(step_profiler)
        if trainer.state.step == 3:
            step_profiler = profile(activities=[ProfilerActivity.CPU])
            step_profiler.__enter__()
        original(batches, window)

    trainer.train_step = train_step
    _fit(trainer, out / name)
    batches = iter(trainer.stream)

    def by_hand():
        for _ in range(acc.gradient_accumulation_steps):
            batch = next(batches)
            with acc.accumulate(model):
                losses, _ = model(batch)
                acc.backward(losses["cls_loss"])
                optimizer.step()
                optimizer.zero_grad()

    by_hand()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        by_hand()
    counted["by_hand"] = _counts(profiler)
    acc.free_memory()
    return counted


def stop_on_one_rank(out: Path) -> dict[str, Any]:
    """SIGUSR2 reaches rank 1 alone, at the start of step 2: the ranks agree through the step's
    one check and both stop after it, each with the checkpoint of step 3."""
    import signal

    from memetrain.errors import TrainingStopped

    class Signalled(LinearMethod):
        def before_step(self, step, total_steps):
            if step == 2 and torch.distributed.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGUSR2)

    trainer = _trainer(_trainer_options("ddp", 6, "trainer.checkpoint_every=100"), Signalled, out / "stop", 2)
    try:
        _fit(trainer, out / "stop")
        stopped = None
    except TrainingStopped as error:
        stopped = {"signal": error.signal_name, "step": error.step, "checkpoint": Path(error.checkpoint).name}
    every = [None] * trainer.accelerator.num_processes
    torch.distributed.all_gather_object(every, stopped)
    trainer.accelerator.free_memory()
    return {"ranks": every}


def deepspeed_buffers(out: Path) -> dict[str, Any]:
    """ZeRO-2, a batch norm, 2 micro-batches per step: the broadcasts of a training step, then one
    trainer broadcast of the buffers (what validation and the end of training call) and the
    running statistics on each rank before and after it."""
    from torch.profiler import ProfilerActivity, profile

    from memetrain.engine.trainer import _Window

    trainer = _trainer(_trainer_options("deepspeed_zero2", 3), BatchNormMethod, out / "buffers", batch_size=2)
    _fit(trainer, out / "buffers")  # 3 steps, and the broadcast after them
    batches = iter(trainer.stream)
    with profile(activities=[ProfilerActivity.CPU]) as step_profile:
        trainer.train_step(batches, _Window())
    norm = trainer.method.norm
    before = [norm.running_mean.clone(), norm.num_batches_tracked.clone()]
    with profile(activities=[ProfilerActivity.CPU]) as broadcast_profile:
        trainer._broadcast_buffers()
    every = [None] * trainer.accelerator.num_processes
    mine = {
        "before": [t.tolist() for t in before],
        "after": [norm.running_mean.tolist(), norm.num_batches_tracked.item()],
    }
    torch.distributed.all_gather_object(every, mine)
    trainer.accelerator.free_memory()
    return {"step": _counts(step_profile), "broadcast": _counts(broadcast_profile), "ranks": every}


def evaluation_precision(out: Path) -> dict[str, Any]:
    """Evaluation (eval.protocols.collect) of a classifying method trained by ZeRO-2 in bf16: the
    dtype its encoder computes in, and how often it runs per batch."""
    from memetrain.engine.distributed import build_accelerator
    from memetrain.eval.protocols import collect
    from tests.engine.training_cases_script import FixedBatches

    class Classifier(LinearMethod):
        """An encoder (a linear map of the pixels) and a head; predict = head(embed)."""

        targets = ["label"]

        def __init__(self):
            super().__init__()
            self.encoder, self.layer = torch.nn.Linear(3 * 32 * 32, 8), torch.nn.Linear(8, 1)

        def embed(self, batch):
            return self.encoder(batch["image"].float().flatten(1) / 255)

        def predict(self, batch):
            return self.layer(self.embed(batch))

        def embed_and_predict(self, batch):
            features = self.embed(batch)
            return features, self.layer(features)

    accelerator = build_accelerator(_trainer_options("deepspeed_zero2", 1, "trainer.precision=bf16"), 4, 1)
    torch.manual_seed(0)
    method = Classifier()
    model, _ = accelerator.prepare(method, torch.optim.SGD(method.parameters(), lr=0.1))
    dtypes = []
    method.encoder.register_forward_hook(lambda module, inputs, output: dtypes.append(str(output.dtype)))
    stream = FixedBatches(4, 1, accelerator.process_index, accelerator.num_processes)
    batches = [next(iter(stream)) for _ in range(2)]
    outputs = collect(method, batches, accelerator, want_logits=True)
    accelerator.free_memory()
    return {"dtypes": dtypes, "rows": len(outputs.ids), "logits": list(outputs.logits.shape)}


def clamp(out: Path, stage: int) -> dict[str, Any]:
    """CLIP at its bound (init = max logit scale = 20) with a loss term that pushes the log scale up
    at every step; 4 steps. Records, at each after-step, the log scale before the clamp (what the
    step made of the previous weights) and DeepSpeed's master copy after it."""
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    from memetrain.methods import build_method
    from tests.engine.training_cases_script import DATA, MODELS

    options = _trainer_options(
        f"deepspeed_zero{stage}",
        4,
        f"trainer.lr={PUSH_LR}",
        f"trainer.min_lr={PUSH_LR}",
        "trainer.warmup_steps=0",
    )
    pre_clamp, masters = [], []

    def pushed_clip():
        clip = build_method(
            "clip",
            {"embed_dim": 16, "init_logit_scale": BOUND, "max_logit_scale": BOUND},
            MODELS["clip"],
            DATA,
        )
        step, after_step = clip.training_step, clip.after_step

        def training_step(batch):
            losses, report = step(batch)
            return losses | {"push_loss": -clip.model.logit_scale.sum()}, report

        def recording_after_step(step_index, total):
            pre_clamp.append(clip.model.logit_scale.detach().float().item())
            after_step(step_index, total)

        clip.training_step, clip.after_step = training_step, recording_after_step
        return clip

    trainer = _trainer(options, pushed_clip, out / f"clamp-zero{stage}")
    original_train_step = trainer.train_step

    def train_step(batches, window):
        original_train_step(batches, window)
        masters.append(safe_get_full_fp32_param(trainer.method.model.logit_scale).item())  # every rank

    trainer.train_step = train_step
    state = _fit(trainer, out / f"clamp-zero{stage}")
    saved = load_file(str(out / f"clamp-zero{stage}" / "checkpoints" / "step_0000004" / "model.safetensors"))
    result = {
        "steps": state.step,
        "pre_clamp": pre_clamp,
        "masters": masters,
        "saved": saved["model.logit_scale"].item(),
        "saved_shape": list(saved["model.logit_scale"].shape),
    }
    trainer.accelerator.free_memory()
    return result


def bf16_reduction(out: Path) -> dict[str, Any]:
    """One SGD step (lr 1) of ZeRO-2 under trainer.precision=bf16 on 2 ranks, each its own batch,
    against the same step by hand: each rank's gradient under the same bf16 autocast, averaged
    over the ranks in float32. Returns the largest relative difference of the new weights."""
    from torch import nn

    from memetrain.engine.distributed import build_accelerator

    options = _trainer_options("deepspeed_zero2", 1, "trainer.precision=bf16", "trainer.grad_clip=null")
    accelerator = build_accelerator(options, 4, 1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 8)
    )  # Linear: DeepSpeed's bf16-safe modules
    reference = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 8))
    reference.load_state_dict(model.state_dict())
    engine, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    rank = accelerator.process_index
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + rank)) * 3
    accelerator.backward(engine(x).float().square().mean())  # DeepSpeed steps in the last backward
    optimizer.step()
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reference(x).float().square().mean()
    loss.backward()
    worst = 0.0
    for trained, param in zip(engine.module.parameters(), reference.parameters()):
        grad = param.grad.clone()
        torch.distributed.all_reduce(grad)
        expected = param.detach() - grad / accelerator.num_processes
        moved = (expected - param.detach()).abs().max()
        worst = max(worst, ((trained.detach() - expected).abs().max() / moved).item())
    accelerator.free_memory()
    return {"worst_relative_difference": worst}


SCENARIOS = {
    "syncbn-cpu": sync_batchnorm_on_cpu,
    "compile-accumulation": compiled_accumulation,
    "collectives-ddp": lambda out: per_step_collectives(out, "ddp"),
    "stop-one-rank": stop_on_one_rank,
    "clamp-zero1": lambda out: clamp(out, 1),
    "clamp-zero2": lambda out: clamp(out, 2),
    "bf16-reduce-zero2": bf16_reduction,
    "collectives-zero2": lambda out: per_step_collectives(out, "deepspeed_zero2"),
    "buffers-zero2": deepspeed_buffers,
    "eval-zero2-bf16": evaluation_precision,
}


def main(out: Path, names: list[str]) -> None:
    for name in names:
        result = SCENARIOS[name](out)
        if int(os.environ.get("RANK", 0)) == 0:
            (out / f"{name}.json").write_text(json.dumps(result))
        _fresh_accelerate_state()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- the tests ---------------------------------------------------------------------------------------

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_paths")
    process = subprocess.run(
        [*torchrun(2), str(SCRIPT), str(out), *SCENARIOS],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    return out


def result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_clip_s_clamp_reaches_deepspeed_s_master_copy(results, stage):
    """Each step pushes the log scale past log(20); the clamp after it must hold in the master copy
    that DeepSpeed steps from: the next step then starts at the bound and moves it by one step's
    worth (~lr), instead of carrying on from where the unclamped copy had got to."""
    got, bound = result(results, f"clamp-zero{stage}"), math.log(BOUND)
    assert got["steps"] == 4 and len(got["pre_clamp"]) == 4
    assert all(value > bound + PUSH_LR / 2 for value in got["pre_clamp"]), "the push never passed the bound"
    assert all(value < bound + 1.5 * PUSH_LR for value in got["pre_clamp"]), (
        f"steps started from an unclamped master copy: {got['pre_clamp']} (bound {bound:.4f})"
    )
    assert got["masters"] == pytest.approx([bound] * 4, abs=1e-6)
    assert got["saved"] == pytest.approx(bound, abs=1e-6) and got["saved_shape"] == []


@pytest.mark.slow
def test_zero2_bf16_averages_gradients_in_float32(results):
    """In bf16 the average of the two ranks' gradients is off by ~2^-9 relative (DeepSpeed's
    default for Linear/Conv weights under torch autocast); in float32 by summation order only."""
    assert result(results, "bf16-reduce-zero2")["worst_relative_difference"] < 1e-5


@pytest.mark.slow
def test_torch_s_sync_batchnorm_runs_on_gpus_only(results):
    """If this fails, torch synchronises batch norms on CPU now: trainer.sync_batchnorm could allow
    it there, and a 2-rank test could compare its statistics with one process's on the whole batch
    (benchmarks/gpu_check.sh does that on a GPU)."""
    assert "SyncBatchNorm expected input tensor to be on GPU" in result(results, "syncbn-cpu")["error"]


@pytest.mark.slow
def test_compiled_ddp_all_reduces_once_per_optimizer_step(results):
    """3 steps of 2 micro-batches, one gradient bucket: 3 all-reduces. The trainer's unwrapping
    used to put the bare method into the compiled wrapper in place of the DDP module (6: every
    micro-batch's backward reduced)."""
    got = result(results, "compile-accumulation")
    assert got["steps"] == 3 and got["compiled_wraps"] == "DistributedDataParallel"
    assert got["allreduces"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_step_adds_one_collective_and_one_host_sync(results, strategy):
    """Before: the loss all-reduced for the finiteness check, a host sync for each of loss and
    gradient norm, and another all-reduce and sync for the stop-signal agreement."""
    got = result(results, f"collectives-{strategy}")
    trainer, by_hand = got["trainer"], got["by_hand"]
    assert trainer["collectives"] - by_hand["collectives"] == 1, (trainer["names"], by_hand["names"])
    assert trainer["host_syncs"] - by_hand["host_syncs"] == 1


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(results):
    rank0, rank1 = result(results, "stop-one-rank")["ranks"]
    assert rank1 == {"signal": "SIGUSR2", "step": 3, "checkpoint": "step_0000003"}
    assert rank0 == {"signal": "a signal on another rank", "step": 3, "checkpoint": "step_0000003"}


@pytest.mark.slow
def test_deepspeed_broadcasts_batch_norm_statistics_once_where_they_are_read(results):
    """Train-mode batch norm normalises with the batch's statistics, so ranks may differ in the
    running ones while they train; before, each buffer went out in its own broadcast before every
    micro-batch (3 buffers x 2 micro-batches here)."""
    got = result(results, "buffers-zero2")
    assert "c10d::broadcast_" not in got["step"]["names"]
    assert got["broadcast"]["names"] == ["c10d::broadcast_"]
    rank0, rank1 = got["ranks"]
    assert rank0["before"][0] != rank1["before"][0], "the ranks' statistics never differed"
    assert rank0["after"] == rank1["after"] == [rank0["before"][0], rank0["before"][1]]
    assert rank0["after"][1] == 8  # 4 steps x 2 micro-batches on rank 0's own batches


@pytest.mark.slow
def test_evaluation_under_deepspeed_bf16_runs_once_per_batch_in_bf16(results):
    """Before: float32 (DeepSpeed's autocast lives in its engine, which evaluation does not call, and
    Accelerate's stays off under DeepSpeed), and the encoder ran twice per batch (embed, then predict)."""
    got = result(results, "eval-zero2-bf16")
    assert got["dtypes"] == ["torch.bfloat16"] * 2
    assert got["rows"] == 16 and got["logits"] == [16, 1]  # 2 batches of 4 on each of 2 ranks, gathered


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(Path(sys.argv[1]), sys.argv[2:])
