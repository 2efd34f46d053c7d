"""Training-step overhead: the framework's Trainer loop against a hand-written PyTorch loop (CPU).

    .venv/bin/python benchmarks/train_step.py              # both models, recorded (make bench)
    .venv/bin/python benchmarks/train_step.py --quick      # smoke run, not recorded
    .venv/bin/python benchmarks/train_step.py --cases clip_small --blocks 7

For each case the method is built from the Hydra configs as ``launcher/train.py`` builds it
(``configs/train.yaml`` with the case's overrides) and goes through Accelerate into the real
:class:`Trainer`, whose ``fit`` loop runs it (schedules, hooks, accumulate and autocast contexts,
clipping, the finiteness check, the running log window, tqdm, and every ``log_every`` steps a
TensorBoard and metrics.jsonl row). A bare loop trains the same model instance with the same torch
AdamW: the learning-rate and weight-decay schedule set by hand, zero_grad, the method's
``training_step`` (the same loss), backward, clip_grad_norm_, AdamW step, the method's
``after_step``. Both read the same batches, held in memory. Blocks of ``--steps`` steps (a
multiple of log_every) alternate ABBA after a warm-up block each; the overhead is the median of
the per-pair time ratios minus 1, in wall time (the target: <= 3 %) and in this process's CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from report import machine_info, median, record, spread  # benchmarks/report.py (the script's folder)

from memetrain.data.manifest import Manifest
from memetrain.data.pack import PackOptions, pack
from memetrain.data.sources.synth import SynthMemes
from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.tokenizer import TextEncoder
from memetrain.data.transforms import build_view
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.distributed import build_accelerator
from memetrain.engine.logger import RunLogger
from memetrain.engine.model_options import apply_trainer_options
from memetrain.engine.optim import build_optimizer
from memetrain.engine.schedules import cosine, warmup_cosine
from memetrain.engine.trainer import Trainer, TrainerSettings
from memetrain.methods import DataInfo, build_method

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OVERHEAD_TARGET = 0.03
CASES = {
    "fusion_concat": ["method=supervised", "model=fusion_concat"],  # ResNet-18 + LSTM, concat fusion
    "clip_small": ["method=clip", "model=clip_small"],  # ResNet-18 + 2-layer transformer, InfoNCE
}
CASE_NAMES = {
    "fusion_concat": "supervised, concat fusion ResNet-18 + LSTM",
    "clip_small": "CLIP, ResNet-18 + 2-layer transformer",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=10, help="steps per timed block (a multiple of log_every)"
    )
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per loop (median of pairs)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps, 2 blocks, not recorded")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md even with --quick")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.blocks = 10, 2
    return args


def pack_data(tmp: Path, image_size: int) -> Path:
    """A small SynthMemes pack: its tokenizer sets the text towers' vocabulary."""
    options = {"count": 200, "image_size": image_size, "seed": 0}
    pack(SynthMemes(**options), tmp / "shards", PackOptions(workers=1, max_samples_per_shard=100), options)
    return tmp / "shards"


def config(case: str, shards: Path, args: argparse.Namespace):
    overrides = [
        *CASES[case],
        f"data.shards={shards}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"trainer.global_batch_size={args.batch_size}",
        "trainer.max_steps=100000",  # schedules as in a long run; no step reaches it
    ]
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("train", overrides=overrides)


def in_memory_batches(cfg, count: int) -> tuple[list[dict], DataInfo]:
    """``count`` training batches as the stream delivers them, held in memory for both loops."""
    manifest = Manifest.load(cfg.data.shards)
    encoder = TextEncoder(manifest.root / manifest.tokenizer, cfg.data.max_length)
    view = OmegaConf.to_container(cfg.method.view, resolve=True)
    settings = StreamSettings(batch_size=cfg.data.batch_size, num_workers=0, drop_last=True)
    stream = MemeStream(cfg.data.shards, cfg.data.train_split, settings, build_view(**view), encoder)
    batches = list(itertools.islice(itertools.cycle(stream), count))
    info = DataInfo(manifest.label_names, manifest.main_label, encoder.vocab_size, encoder.pad_id)
    return batches, info


def build(cfg, info: DataInfo):
    """The method from the configs, seeded, as run.py builds it."""
    torch.manual_seed(cfg.seed)
    options = OmegaConf.to_container(cfg.method, resolve=True)
    name = options.pop("name")
    options.pop("view")
    return build_method(name, options, OmegaConf.to_container(cfg.model, resolve=True), info)


class FrameworkLoop:
    """The real Trainer's ``fit``, run block by block; checkpoints are not written (a benchmark)."""

    def __init__(self, cfg, info: DataInfo, batches: list[dict], run_dir: Path):
        t, options = cfg.trainer, OmegaConf.to_container(cfg.trainer, resolve=True)
        accelerator = build_accelerator(options, cfg.data.batch_size, 1)  # as run.py builds them
        method = build(cfg, info)
        scalars = apply_trainer_options(method, options, 1)
        optimizer = build_optimizer(method.param_groups(t.weight_decay), options, accelerator.device)
        model, optimizer = accelerator.prepare(method, optimizer)
        settings = TrainerSettings(**{field: t[field] for field in TrainerSettings.__dataclass_fields__})
        checkpointer = Checkpointer(run_dir / "checkpoints", 1, accelerator, scalars)
        self.trainer = Trainer(settings, accelerator, model, optimizer, batches, checkpointer, "")
        self.trainer.save = lambda: None  # the checkpoint at the end of each block is not timed work
        self.run_dir = run_dir
        self.starts: list[tuple[float, float]] = []
        step = self.trainer.train_step

        def timed_step(*args):
            self.starts.append((time.perf_counter(), time.process_time()))
            step(*args)

        self.trainer.train_step = timed_step

    def block(self, steps: int) -> tuple[float, float]:
        """Wall and CPU seconds of ``steps`` loop iterations: from the first step's start to the
        start of the one after the last (an extra step ends the block, so fit's per-run setup and
        final save are outside the window)."""
        trainer = self.trainer
        trainer.s = dataclasses.replace(trainer.s, max_steps=trainer.state.step + steps + 1)
        self.starts = []
        trainer.fit(lambda step: RunLogger(self.run_dir, True, step))
        trainer.logger.close()
        (wall_0, cpu_0), (wall_1, cpu_1) = self.starts[0], self.starts[steps]
        return wall_1 - wall_0, cpu_1 - cpu_0


class BareLoop:
    """What a user writes by hand around the same method, optimizer, schedule and batches.

    It trains the Trainer's own model instance with the torch AdamW inside Accelerate's wrapper:
    two instances of the same network, built alike, ran 1-7 % apart here whichever loop drove
    them (memory placement), which would otherwise read as framework overhead or gain.
    """

    def __init__(self, cfg, framework: FrameworkLoop, batches: list[dict]):
        self.t = cfg.trainer
        self.method = framework.trainer.method
        self.optimizer = framework.trainer.optimizer.optimizer  # accelerate.optimizer.AcceleratedOptimizer's
        self.batches = itertools.cycle(batches)
        self.step = 0

    def block(self, steps: int) -> tuple[float, float]:
        method, optimizer, t = self.method, self.optimizer, self.t
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(self.batches)
            # the same schedule, so both loops compute the same numbers (a LambdaLR in a hand-written loop)
            lr = warmup_cosine(self.step, t.max_steps, t.warmup_steps, t.lr, t.min_lr)
            weight_decay = cosine(self.step, t.max_steps, t.weight_decay, t.weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group["weight_decay"] > 0:
                    group["weight_decay"] = weight_decay
            optimizer.zero_grad(set_to_none=True)
            losses, _ = method.training_step(batch)
            loss = sum(value for name, value in losses.items() if name.endswith("_loss"))
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(method.parameters(), t.grad_clip)
            optimizer.step()
            method.after_step(self.step, t.max_steps)
            self.step += 1
        return time.perf_counter() - start, time.process_time() - cpu


def bench_case(case: str, shards: Path, args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Per-step wall and CPU seconds of each timed block, per loop."""
    cfg = config(case, shards, args)
    if args.steps % cfg.trainer.log_every:
        raise SystemExit(
            f"--steps {args.steps} must be a multiple of trainer.log_every={cfg.trainer.log_every}"
        )
    batches, info = in_memory_batches(cfg, 8)
    framework = FrameworkLoop(cfg, info, batches, tmp / case)
    bare = BareLoop(cfg, framework, batches)
    times: dict[str, list[float]] = {"framework": [], "bare": [], "framework_cpu": [], "bare_cpu": []}
    order = (("framework", framework), ("bare", bare))
    for block in range(args.blocks + 1):  # block 0 warms up allocators, caches and the first log row
        for name, loop in order if block % 2 else order[::-1]:  # ABBA: a drifting load cancels
            wall, cpu = loop.block(args.steps)
            if block:
                times[name].append(wall / args.steps)
                times[f"{name}_cpu"].append(cpu / args.steps)
    for reset in (AcceleratorState, GradientState):
        reset._reset_state()
    PartialState._reset_state()
    return times


def build_table(args: argparse.Namespace, results: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "| case | framework step | bare loop step | overhead, wall time | spread | overhead, CPU time | spread | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, times in results.items():
        wall = [f / b - 1 for f, b in zip(times["framework"], times["bare"])]
        cpu = [f / b - 1 for f, b in zip(times["framework_cpu"], times["bare_cpu"])]
        verdict = "met" if median(wall) <= OVERHEAD_TARGET else "not met"
        lines.append(
            f"| {CASE_NAMES[case]}, {args.image_size} px, batch {args.batch_size} "
            f"| {median(times['framework']) * 1e3:.1f} ms | {median(times['bare']) * 1e3:.1f} ms "
            f"| {median(wall) * 100:+.1f} % | {spread([o * 100 for o in wall], 1)} % "
            f"| {median(cpu) * 100:+.1f} % | {spread([o * 100 for o in cpu], 1)} % "
            f"| <= {OVERHEAD_TARGET * 100:.0f} % ({verdict}) |"
        )
    return "\n".join(lines) + (
        f"\n\nCPU, {args.threads} torch thread(s), fp32, AdamW, grad clip as configured; {args.blocks} "
        f"blocks of {args.steps} steps per loop after a warm-up block, alternating; overheads are "
        "medians of per-pair ratios (CPU time: this process's, unmoved by other processes' load)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {info}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memetrain-bench-") as tmp:
        shards = pack_data(Path(tmp), args.image_size)
        results = {case: bench_case(case, shards, args, Path(tmp)) for case in args.cases}
    table = build_table(args, results)
    print(f"\n{table}\n\n({time.perf_counter() - start:.0f} s in all)")
    if not args.quick or args.record:
        record("Training step", info, table)


if __name__ == "__main__":
    main()
