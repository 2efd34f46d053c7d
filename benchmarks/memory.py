"""Peak memory of a ViT-B/16 training step with gradient checkpointing against the same without (CPU).

    .venv/bin/python benchmarks/memory.py              # batch 32 at 224 px, recorded (make bench)
    .venv/bin/python benchmarks/memory.py --quick      # batch 4, not recorded
    .venv/bin/python benchmarks/memory.py --batch-size 64 --steps 3

The encoder is built as the framework builds ``model.image`` for ``model=backbone_vit_b16``
(``configs/model/image/vit_b16.yaml`` through Hydra: timm ``vit_base_patch16_224``, random init,
nothing downloaded), and checkpointing is turned on as ``trainer.gradient_checkpointing=true`` does
it (:func:`memetrain.models.memory.enable_gradient_checkpointing`). Each variant runs in a fresh
Python process: uint8 images through the encoder's normaliser, a mean-square loss on the pooled
features, backward, AdamW step, ``--steps`` times (the first allocates the optimizer state). Memory is read from the process's resident set
(``ru_maxrss`` for the peak), which sees torch's CPU allocations (tracemalloc does not); glibc is
told to map every allocation over 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor
leaves the resident set at once and the peak is the peak of live memory, not of a fragmented heap.
The headline is the training memory, the peak minus the resident size after the imports, before
the model is built: weights, gradients, AdamW state and activations, what
``torch.cuda.max_memory_allocated`` counts on a GPU; the whole process's peak is shown beside it.
Target: checkpointed / plain training memory <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RATIO_TARGET = 0.5
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
VARIANTS = ("plain", "checkpointed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant (>= 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each variant's process")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, not recorded")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md even with --quick")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size = min(args.batch_size, 4)
    return args


def rss_now() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """In the child process: build the encoder, train ``--steps`` steps, report memory and time."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from memetrain.engine.optim import build_adamw, decay_groups
    from memetrain.models import build_image_encoder
    from memetrain.models.memory import enable_gradient_checkpointing

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runtime = rss_now()  # interpreter and libraries
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=["model=backbone_vit_b16", f"data.image_size={args.image_size}"])
    encoder = build_image_encoder(**OmegaConf.to_container(cfg.model.image, resolve=True))
    if args.variant == "checkpointed":
        enable_gradient_checkpointing(encoder)  # what trainer.gradient_checkpointing=true does
    encoder.train()
    optimizer = build_adamw(decay_groups(encoder, 0.05), 1e-4, (0.9, 0.999), 1e-8, torch.device("cpu"))
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = encoder(images).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "peak": peak,
        "runtime": runtime,
        "seconds": min(seconds[1:]),
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "checkpointing": bool(getattr(encoder.model, "grad_checkpointing", False)),
    }


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        f"--variant={variant}",
        f"--batch-size={args.batch_size}",
        f"--image-size={args.image_size}",
        f"--steps={args.steps}",
        f"--threads={args.threads}",
    ]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode:
        raise SystemExit(f"the {variant} variant failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_table(args: argparse.Namespace, runs: dict[str, dict[str, float]]) -> str:
    plain, checkpointed = runs["plain"], runs["checkpointed"]
    training = [run["peak"] - run["runtime"] for run in (plain, checkpointed)]
    ratio = training[1] / training[0]
    verdict = "met" if ratio <= RATIO_TARGET else "not met"
    gib = 2**30
    lines = [
        "| benchmark | plain | checkpointed | checkpointed / plain | target |",
        "|---|---|---|---|---|",
        f"| peak training memory, ViT-B/16, batch {args.batch_size}, {args.image_size} px "
        f"(weights, gradients, AdamW state, activations) "
        f"| {training[0] / gib:.2f} GiB | {training[1] / gib:.2f} GiB | {ratio:.2f}x "
        f"| <= {RATIO_TARGET}x ({verdict}) |",
        f"| peak RSS of the whole process (interpreter and libraries: {plain['runtime'] / gib:.2f} GiB) "
        f"| {plain['peak'] / gib:.2f} GiB | {checkpointed['peak'] / gib:.2f} GiB "
        f"| {checkpointed['peak'] / plain['peak']:.2f}x |  |",
        f"| step time (context: checkpointing recomputes the forward) | {plain['seconds']:.1f} s "
        f"| {checkpointed['seconds']:.1f} s | {checkpointed['seconds'] / plain['seconds']:.2f}x |  |",
    ]
    return "\n".join(lines) + (
        f"\n\nCPU, fp32, {args.threads} torch threads, AdamW; {plain['parameters'] / 1e6:.1f} M parameters; "
        f"{args.steps} steps per variant, each variant in a fresh process; memory from the resident set size "
        "(allocations over 64 KiB mapped on their own)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: the first step allocates the optimizer state")
    from report import machine_info, record  # benchmarks/report.py (the script's folder)

    info = machine_info()
    print(f"machine: {info}", flush=True)
    start = time.perf_counter()
    runs = {variant: measure(variant, args) for variant in VARIANTS}
    if not runs["checkpointed"]["checkpointing"] or runs["plain"]["checkpointing"]:
        raise SystemExit("gradient checkpointing did not switch as asked: fix the benchmark")
    table = build_table(args, runs)
    print(f"\n{table}\n\n({time.perf_counter() - start:.0f} s in all)")
    if not args.quick or args.record:
        record("Gradient checkpointing memory", info, table)


if __name__ == "__main__":
    main()
