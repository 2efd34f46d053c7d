"""CLIP ViT-B/16 training throughput and MFU on one GPU: bf16, the largest batch that fits.

    .venv/bin/python benchmarks/gpu_clip.py                     # ViT-B-16, all 8 variants, recorded
    .venv/bin/python benchmarks/gpu_clip.py --no-compile        # skip the torch.compile variants
    .venv/bin/python benchmarks/gpu_clip.py --max-batch 1024 --steps 20

The model is memetrain's CLIP method built from its configs as a run builds it (``method=clip
model=clip_open_clip method.tower=open_clip method.open_clip_model=ViT-B-16``: open_clip's
ViT-B/16 image tower and 12-layer text transformer, random init, nothing downloaded), trained by
its own ``training_step`` (InfoNCE, learned temperature) under bf16 autocast with AdamW. For
gradient checkpointing off and on, the largest batch that fits is searched upward (doubling, then
one step of +50 %), each try two full steps so the optimizer state is counted; then every
combination of fused / unfused (foreach) AdamW and torch.compile off / on (the two towers'
encoders compiled) is timed at that batch: images/s over ``--steps`` steps after warm-up, and MFU,
the model FLOPs of a step counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward and
backward matmuls, convolutions and attention, counted once without checkpointing: MFU does not
count the recomputed forward) times images/s over the GPU's dense bf16 peak. Captions are
tokenised in Python each step by open_clip's tokenizer, as in a run.
Target (issue 8): MFU >= 45 % on an H100. Needs a CUDA GPU and refuses to run without one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MFU_TARGET = 0.45
PEAK_BF16_DENSE = [  # (substring of torch.cuda.get_device_name(), FLOP/s); first match wins
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
]
CAPTIONS = [
    "when the code finally compiles on the first try",
    "nobody: absolutely nobody: me at three in the morning",
    "a dog in a hat looking at a cat on a sofa",
    "me explaining my weekend plans to my boss",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open-clip-model", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after warm-up)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per variant (compile happens here)"
    )
    parser.add_argument("--start-batch", type=int, default=64, help="first batch size tried")
    parser.add_argument("--max-batch", type=int, default=16384, help="largest batch size tried")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    return parser.parse_args(argv)


def build_clip(open_clip_model: str, image_size: int, checkpointing: bool, device: torch.device):
    """memetrain's CLIP method with open_clip towers, from the configs, on ``device``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from memetrain.methods import DataInfo, build_method

    overrides = [
        "method=clip",
        "model=clip_open_clip",
        "method.tower=open_clip",
        f"method.open_clip_model={open_clip_model}",
        f"data.image_size={image_size}",
    ]
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=overrides)
    options = OmegaConf.to_container(cfg.method, resolve=True)
    options.pop("name"), options.pop("view")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    method = build_method("clip", options, model, DataInfo(["label"], "label", vocab_size=None))
    method.model.clip.set_grad_checkpointing(checkpointing)
    return method.to(device).train()


def compile_towers(method) -> None:
    """torch.compile the image and text encoders (captions are tokenised outside, in Python)."""
    clip = method.model.clip
    clip.encode_image = torch.compile(clip.encode_image)
    clip.encode_text = torch.compile(clip.encode_text)


def make_batch(batch_size: int, image_size: int, device: torch.device) -> dict:
    """uint8 images on the device and captions, as the stream and the trainer hand them over."""
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.randint(
        0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator
    )
    return {"image": images.to(device), "text": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]}


def make_optimizer(method, fused: bool) -> torch.optim.AdamW:
    from memetrain.engine.optim import decay_groups

    options = {"fused": True} if fused else {"foreach": method.model.logit_scale.device.type == "cuda"}
    return torch.optim.AdamW(decay_groups(method, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, **options)


def train_step(method, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One optimizer step as the trainer takes it: bf16 autocast, the summed ``_loss`` terms."""
    device_type = batch["image"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        losses, _ = method.training_step(batch)
        loss = sum(value for name, value in losses.items() if name.endswith("_loss"))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(0, 1)


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def model_flops_per_image(args: argparse.Namespace, device: torch.device, batch_size: int = 16) -> float:
    """Model FLOPs per image of a training step, counted without checkpointing (whose recomputed
    forward MFU does not count) at a small batch (the batch x batch logits are negligible)."""
    method = build_clip(args.open_clip_model, args.image_size, False, device)
    optimizer = make_optimizer(method, fused=False)
    flops = step_flops(lambda: train_step(method, optimizer, make_batch(batch_size, args.image_size, device)))
    return flops / batch_size


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name; None if the table does not know it."""
    for key, flops in PEAK_BF16_DENSE:
        if key in device_name:
            return flops
    return None


def fits(method, batch_size: int, image_size: int, device: torch.device) -> bool:
    """Whether two full steps at ``batch_size`` fit in GPU memory."""
    optimizer = make_optimizer(method, fused=False)
    try:
        batch = make_batch(batch_size, image_size, device)
        for _ in range(2):
            train_step(method, optimizer, batch)
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del optimizer
        method.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def largest_batch(method, args: argparse.Namespace, device: torch.device) -> int:
    """Double from ``--start-batch`` while it fits, then try one +50 % step past the last fit."""
    best, size = 0, args.start_batch
    while size <= args.max_batch and fits(method, size, args.image_size, device):
        best, size = size, size * 2
    if best == 0:
        raise SystemExit(f"even batch {args.start_batch} does not fit; lower --start-batch")
    middle = best * 3 // 2
    if best < middle <= args.max_batch and fits(method, middle, args.image_size, device):
        best = middle
    return best


def images_per_second(method, optimizer, batch: dict, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        train_step(method, optimizer, batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(method, optimizer, batch)
    torch.cuda.synchronize()
    return steps * len(batch["text"]) / (time.perf_counter() - start)


def build_table(rows: list[dict], device_name: str, peak: float | None) -> str:
    """One line per variant: batch, images/s, MFU (``–`` when the GPU's peak is unknown)."""
    lines = [
        "| checkpointing | torch.compile | AdamW | batch | images/s | TFLOP/s | MFU | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        achieved = row["flops_per_image"] * row["images_per_second"]
        mfu = f"{achieved / peak * 100:.1f} %" if peak else "–"
        verdict = (
            f">= {MFU_TARGET * 100:.0f} % ({'met' if achieved / peak >= MFU_TARGET else 'not met'})"
            if peak
            else ""
        )
        lines.append(
            f"| {'on' if row['checkpointing'] else 'off'} | {'on' if row['compile'] else 'off'} "
            f"| {'fused' if row['fused'] else 'foreach'} | {row['batch']} | {row['images_per_second']:.0f} "
            f"| {achieved / 1e12:.1f} | {mfu} | {verdict} |"
        )
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown (add it to PEAK_BF16_DENSE)"
    return "\n".join(lines) + (
        f"\n\n{device_name}, peak {peak_text}; bf16 autocast; FLOPs per image from FlopCounterMode over one "
        "step (forward + backward, recomputation not counted)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_clip.py measures GPU training throughput and needs a CUDA GPU; none is visible here "
            "(torch.cuda.is_available() is False). Run it on a GPU machine; the CPU benchmarks are `make bench`."
        )
    from report import machine_info, record  # benchmarks/report.py (the script's folder)

    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    info = machine_info(GPU=device_name, CUDA=torch.version.cuda or "?")
    print(f"machine: {info}", flush=True)
    flops_per_image = model_flops_per_image(args, device)
    print(f"{flops_per_image / 1e9:.1f} GFLOP per image per step (forward + backward)", flush=True)
    rows = []
    for checkpointing in (False, True):
        method = build_clip(args.open_clip_model, args.image_size, checkpointing, device)
        batch_size = largest_batch(method, args, device)
        batch = make_batch(batch_size, args.image_size, device)
        print(f"checkpointing {'on' if checkpointing else 'off'}: largest batch {batch_size}", flush=True)
        for compiled in (False, True) if not args.no_compile else (False,):
            if compiled:
                compile_towers(method)
            for fused in (False, True):
                optimizer = make_optimizer(method, fused)
                rate = images_per_second(method, optimizer, batch, args.steps, args.warmup)
                rows.append(
                    dict(
                        checkpointing=checkpointing, compile=compiled, fused=fused, batch=batch_size,
                        images_per_second=rate, flops_per_image=flops_per_image,
                    )
                )  # fmt: skip
                print(
                    build_table(rows[-1:], device_name, peak_flops(device_name)).splitlines()[2], flush=True
                )
        del method, optimizer, batch
        torch.cuda.empty_cache()
    table = build_table(rows, device_name, peak_flops(device_name))
    print(f"\n{table}")
    if args.record:
        record(f"GPU CLIP {args.open_clip_model} throughput", info, table)


if __name__ == "__main__":
    main()
