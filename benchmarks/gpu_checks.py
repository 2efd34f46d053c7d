"""The GPU-readiness checks that ``benchmarks/gpu_check.sh`` runs: each builds the real engine
(``build_accelerator``, the method from the Hydra configs, ``build_optimizer``, ``Trainer.train_step``)
on synthetic batches and prints one line, ``PASS|FAIL|SKIP <check>: <figure>``.

    python benchmarks/gpu_checks.py --list
    python benchmarks/gpu_checks.py precision kernels          # groups (each in its own process: see gpu_check.sh)
    python benchmarks/gpu_checks.py clip-bf16 fused-adamw      # or single checks
    python benchmarks/gpu_checks.py --cpu-smoke all            # on CPU, tiny: every check that can run there

Precision checks take 3 optimizer steps from the same weights on the same batches in float32 and
in the precision under test, and compare the training losses: the first (same weights) within
``TOLERANCE``, the later ones (where an fp16 step the scaler skipped makes the weights differ) are
shown. ``--cpu-smoke`` runs the checks' CPU-runnable paths (fp16 through torch's CPU GradScaler
given to the Accelerator, as on a GPU; DeepSpeed over gloo) and skips what needs CUDA.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from gpu_engine import (  # benchmarks/gpu_engine.py (the script's folder)
    LENGTH,
    TOLERANCE,
    Setup,
    Skip,
    build_trainer,
    compare_precision,
    fmt,
    method_factory,
    options_for,
    train,
    trainer_options,
)

CHECKS: dict[str, tuple[str, Callable]] = {}  # name -> (group, check)


def check(name: str, group: str):
    def register(function):
        CHECKS[name] = (group, function)
        return function

    return register


# -- precision ------------------------------------------------------------------------------------------


@check("clip-bf16", "precision")
def clip_bf16(setup):
    return compare_precision(setup, "clip", "clip_small", "bf16")


@check("clip-fp16", "precision")
def clip_fp16(setup):
    return compare_precision(setup, "clip", "clip_small", "fp16")


@check("dino-bf16", "precision")
def dino_bf16(setup):
    return compare_precision(setup, "dino", "backbone_resnet18", "bf16")


@check("dino-fp16", "precision")
def dino_fp16(setup):
    return compare_precision(setup, "dino", "backbone_resnet18", "fp16")


@check("fp16-overflow-skip", "precision")
def fp16_overflow_skip(setup):
    """A loss scale of 2^40 overflows the first fp16 backward: the step must be skipped, counted,
    and CLIP's after-step clamp not run for it (fused AdamW, our CUDA default, included)."""
    factory = method_factory(setup, "clip", "clip_small")
    after = []

    def recording():
        method = factory()
        original = method.after_step
        method.after_step = lambda step, total: (after.append(step), original(step, total))
        return method

    trainer = build_trainer(
        setup, recording, options_for(setup, "single", "fp16"), False, scaler_scale=2.0**40
    )
    train(trainer)
    figure = f"skipped steps {trainer.state.skipped_steps}, after_step ran for steps {after}, scale now {trainer.accelerator.scaler.get_scale():g}"
    assert trainer.state.skipped_steps == 1 and after == [1, 2], figure
    return figure


# -- DeepSpeed (one process) -------------------------------------------------------------------------------


@check("clip-fp16-deepspeed", "deepspeed")
def clip_fp16_deepspeed(setup):
    setup.need_cuda("DeepSpeed fp16")
    return compare_precision(setup, "clip", "clip_small", "fp16", "deepspeed_zero2")


@check("dino-fp16-deepspeed", "deepspeed")
def dino_fp16_deepspeed(setup):
    setup.need_cuda("DeepSpeed fp16")
    return compare_precision(setup, "dino", "backbone_resnet18", "fp16", "deepspeed_zero2")


@check("zero2-step", "deepspeed")
def zero2_step(setup):
    """ZeRO-2 in bf16: a step, the gradient reduction in fp32, and CLIP's clamp in the master copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    factory = method_factory(
        setup, "clip", "clip_small", "method.init_logit_scale=20", "method.max_logit_scale=20"
    )
    options = options_for(setup, "deepspeed_zero2", "bf16", "trainer.lr=0.05", "trainer.min_lr=0.05")
    trainer = build_trainer(setup, factory, options, False)
    losses, seconds = train(trainer, 2)
    master = safe_get_full_fp32_param(trainer.method.model.logit_scale).item()
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    figure = f"losses {fmt(losses)}, {1000 * seconds[-1]:.0f} ms/step, master log scale {master:.4f} (bound {math.log(20):.4f}), gradients averaged in {config['communication_data_type']}"
    assert all(map(math.isfinite, losses)) and master <= math.log(20) + 1e-6, figure
    assert config["torch_autocast"]["lower_precision_safe_modules"] == [], figure
    return figure


# -- kernels and options ------------------------------------------------------------------------------------


@check("fused-adamw", "kernels")
def fused_adamw(setup):
    """torch's fused AdamW (what build_optimizer gives on CUDA) against the foreach one: same weights."""
    from memetrain.engine.optim import build_adamw

    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024, device=setup.device) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    fused = build_adamw([{"params": list(layers[0].parameters())}], 1e-3, (0.9, 0.999), 1e-8, setup.device)
    if setup.device.type == "cpu":  # build_adamw fuses on CUDA only; CPU has the kernel too
        fused = torch.optim.AdamW(layers[0].parameters(), lr=1e-3, fused=True)
    plain = torch.optim.AdamW(layers[1].parameters(), lr=1e-3, foreach=True)
    assert fused.defaults["fused"], "build_adamw did not fuse"
    x = torch.randn(64, 1024, device=setup.device)
    timing = {}
    for name, layer, optimizer in (("fused", layers[0], fused), ("foreach", layers[1], plain)):
        for _ in range(5):
            layer(x).square().mean().backward()
            start = time.perf_counter()
            optimizer.step()
            if setup.cuda:
                torch.cuda.synchronize()
            timing[name] = time.perf_counter() - start
            optimizer.zero_grad()
    difference = max(
        (a - b).abs().max().item() for a, b in zip(layers[0].parameters(), layers[1].parameters())
    )
    figure = f"max weight difference after 5 steps {difference:.2e}, step {1e6 * timing['fused']:.0f} us fused vs {1e6 * timing['foreach']:.0f} us foreach"
    assert difference < 1e-5, figure
    return figure


@check("tf32", "kernels")
def tf32(setup):
    """trainer.tf32=auto on a GPU: TF32 fp32 matmuls, faster than IEEE and within TF32's precision."""
    from memetrain.engine.distributed import gpu_backends, set_gpu_backends

    setup.need_cuda("TF32")
    a, b = (torch.randn(8192, 8192, device="cuda") for _ in range(2))
    rates, results = {}, {}
    for tf32_on in (False, True):
        set_gpu_backends({"tf32": tf32_on, "cudnn_benchmark": False})
        results[tf32_on] = a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        rates[tf32_on] = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    set_gpu_backends(gpu_backends(trainer_options(), True))
    error = ((results[True] - results[False]).norm() / results[False].norm()).item()
    figure = f"fp32 matmul {rates[False]:.0f} TFLOP/s IEEE, {rates[True]:.0f} TFLOP/s TF32 (relative error {error:.1e}); auto resolves to {gpu_backends(trainer_options(), True)}"
    assert rates[True] > 1.5 * rates[False] and error < 1e-2, figure
    return figure


@check("channels-last", "kernels")
def channels_last(setup):
    """trainer.channels_last on a ResNet classifier under bf16: the same losses, weights channels-last."""
    factory = method_factory(setup, "supervised", "resnet18")
    plain = build_trainer(setup, factory, options_for(setup, "single", "bf16"), False)
    reference, plain_seconds = train(plain)
    trainer = build_trainer(
        setup, factory, options_for(setup, "single", "bf16", "trainer.channels_last=true"), False
    )
    losses, seconds = train(trainer)
    convs = [m for m in trainer.method.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    error = abs(losses[0] - reference[0]) / abs(reference[0])
    figure = f"losses {fmt(losses)} vs {fmt(reference)} contiguous (first {error:.2%}), {len(convs)} convolutions channels-last: {layout}, step {1000 * seconds[-1]:.1f} vs {1000 * plain_seconds[-1]:.1f} ms"
    assert layout and error < TOLERANCE["bf16"], figure
    return figure


@check("host-syncs", "kernels")
def host_syncs(setup):
    """CUDA's sync debug mode: a trainer step (not a log step) adds one host sync to the same step
    written by hand (the fused finiteness check)."""
    setup.need_cuda("torch.cuda.set_sync_debug_mode")
    factory = method_factory(setup, "clip", "clip_small")
    trainer = build_trainer(setup, factory, options_for(setup, "single", "bf16"), False)
    train(trainer, 2)
    acc, model, optimizer = trainer.accelerator, trainer.model, trainer.optimizer

    def by_hand(batches, window):
        from memetrain.engine.trainer import to_device

        batch = to_device(next(batches), acc.device)
        with acc.accumulate(model), acc.autocast():
            losses, _ = model(batch)
            acc.backward(sum(v for k, v in losses.items() if k.endswith("_loss")))
            acc.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    counts = {}
    for name, step in (("trainer", trainer.train_step), ("by hand", by_hand)):
        from memetrain.engine.trainer import _Window

        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(trainer.stream, _Window())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    figure = f"host syncs per step: trainer {counts['trainer']}, by hand {counts['by hand']}"
    assert counts["trainer"] - counts["by hand"] <= 1, figure
    return figure


@check("corrupt-sample", "kernels")
def corrupt_sample(setup):
    """A CLIP batch streamed from a pack with one undecodable image: the row stays, marked invalid,
    and the bf16 loss is finite and equals the loss of the batch without it (float32 losses)."""
    import io
    import tarfile

    from memetrain.data.manifest import Manifest
    from memetrain.data.stream import MemeStream, StreamSettings
    from memetrain.data.tokenizer import TextEncoder
    from memetrain.data.transforms import Resize
    from memetrain.methods import DataInfo
    from tests.helpers import agree_manifest, pack_synth

    root = pack_synth(setup.tmp / "pack", count=80, image_size=setup.image_size, per_shard=40)
    path = root / Manifest.load(root).split("train").shards[0].name
    with tarfile.open(path) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers()]
    first = next(i for i, (name, _) in enumerate(members) if name.endswith(".jpg"))
    members[first] = (members[first][0], b"\xff\xd8\xff not a jpeg")
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    agree_manifest(root, "train")
    settings = StreamSettings(batch_size=16, shuffle=False, num_workers=0)
    encoder = TextEncoder(root / Manifest.load(root).tokenizer, LENGTH)
    batch = next(iter(MemeStream(root, "train", settings, Resize(setup.image_size), encoder)))
    clip = method_factory(
        setup, "clip", "clip_small", info=DataInfo(["label"], "label", encoder.vocab_size, encoder.pad_id)
    )()
    clip.to(setup.device)
    moved = {k: v.to(setup.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    keep = moved["valid"]

    def loss_of(rows) -> torch.Tensor:
        losses, _ = clip.training_step(rows)
        return sum(value for name, value in losses.items() if name.endswith("_loss"))

    with torch.autocast(setup.device.type, dtype=torch.bfloat16):
        loss = loss_of(moved)
    clip.eval()  # batch norm on its running statistics: a row's removal changes nothing else
    with torch.no_grad():
        whole = loss_of(moved).item()
        rows = {
            k: v[keep] if torch.is_tensor(v) else [x for x, kept in zip(v, keep.tolist()) if kept]
            for k, v in moved.items()
        }
        without = loss_of(rows).item()
    figure = f"{int((~keep).sum())} of {len(keep)} rows invalid, bf16 loss {loss.item():.4f}, fp32 loss {whole:.5f} vs {without:.5f} without the row"
    assert int((~keep).sum()) == 1 and math.isfinite(loss.item()) and abs(whole - without) < 1e-4, figure
    return figure


# -- torch.compile --------------------------------------------------------------------------------------------


def compiled(setup: Setup, checkpointing: bool) -> str:
    """trainer.compile on a small CLIP (timm's test ResNet and a 2-layer text transformer) under bf16
    (inductor through Accelerate): the losses of eager bf16."""
    setup.need_cuda("trainer.compile (build_accelerator refuses it on CPU)")
    extra = ["trainer.gradient_checkpointing=true"] if checkpointing else []
    factory = method_factory(
        setup, "clip", "clip_small", "model.image.name=test_resnet"
    )  # compiles in less time
    reference, eager = train(
        build_trainer(setup, factory, options_for(setup, "single", "bf16", *extra), False)
    )
    trainer = build_trainer(
        setup, factory, options_for(setup, "single", "bf16", "trainer.compile=true", *extra), False
    )
    losses, seconds = train(trainer)
    error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    figure = f"losses {fmt(losses)} vs eager {fmt(reference)} (largest difference {error:.2%}); first step (compiling) {seconds[0]:.0f} s, then {1000 * seconds[-1]:.1f} ms vs {1000 * eager[-1]:.1f} ms eager"
    assert error < TOLERANCE["bf16"], figure
    return figure


@check("compile", "compile")
def compile_plain(setup):
    return compiled(setup, False)


@check("compile-checkpointing", "compile-checkpointing")
def compile_checkpointing(setup):
    return compiled(setup, True)


# -- process groups ---------------------------------------------------------------------------------------------


@check("nccl-1proc", "nccl")
def nccl_one_process(setup):
    """A process group of one formed as build_accelerator forms it (NCCL on a GPU; gloo in the CPU
    smoke), one all-reduce and the trainer's flat buffer broadcast through it."""
    import datetime
    import os

    from memetrain.engine.distributed import broadcast_from_rank0, form_process_group
    from tests.helpers import free_port

    backend = "nccl" if setup.cuda else "gloo"
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    minute = datetime.timedelta(minutes=1)
    form_process_group(backend, minute, minute, "the check's bound")
    try:
        value = torch.ones(1024, device=setup.device)
        torch.distributed.all_reduce(value)
        norm = torch.nn.BatchNorm1d(8).to(setup.device)
        broadcast_from_rank0([norm.running_mean, norm.num_batches_tracked])
        if setup.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            torch.distributed.all_reduce(value)
        if setup.cuda:
            torch.cuda.synchronize()
        micro = 1e6 * (time.perf_counter() - start) / 100
        figure = f"{backend}: all-reduce of 4 KiB in {micro:.0f} us, sum {value[0].item():g}"
        assert value[0].item() == 1.0, figure
        return figure
    finally:
        torch.distributed.destroy_process_group()


def _sync_batchnorm_rank(rank: int, port: int, out: str) -> None:
    """One of two processes on the one GPU (gloo carries CUDA tensors; NCCL refuses two ranks on a
    device): each normalises its half of a batch through SyncBatchNorm."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    batch = torch.randn(16, 4, 8, 8, device="cuda") * 3 + 1
    norm = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4))).cuda()
    norm(batch[8 * rank : 8 * rank + 8])
    if rank == 0:
        torch.save({"mean": norm[0].running_mean.cpu(), "var": norm[0].running_var.cpu()}, out)
    torch.distributed.destroy_process_group()


@check("sync-batchnorm", "syncbn")
def sync_batchnorm(setup):
    """trainer.sync_batchnorm: two ranks' SyncBatchNorm statistics equal one process's on the whole batch."""
    from tests.helpers import free_port

    setup.need_cuda("SyncBatchNorm (CUDA kernels only)")
    out = setup.tmp / "syncbn.pt"
    torch.multiprocessing.spawn(_sync_batchnorm_rank, args=(free_port(), str(out)), nprocs=2)
    torch.manual_seed(0)
    batch = torch.randn(16, 4, 8, 8, device="cuda") * 3 + 1
    whole = torch.nn.BatchNorm2d(4).cuda()
    whole(batch)
    synced = torch.load(out)
    difference = max(
        (synced["mean"] - whole.running_mean.cpu()).abs().max().item(),
        (synced["var"] - whole.running_var.cpu()).abs().max().item(),
    )
    figure = f"largest difference of the running statistics from one process's on the whole batch: {difference:.1e}"
    assert difference < 1e-5, figure
    return figure


# -- the command line ------------------------------------------------------------------------------------------


def run(names: list[str], setup: Setup) -> int:
    """Run the checks ``names`` in order, one line each; the number that failed."""
    failed = 0
    for name in names:
        start = time.perf_counter()
        try:
            figure, status = CHECKS[name][1](setup), "PASS"
        except Skip as reason:
            figure, status = str(reason), "SKIP"
        except Exception as error:  # a check that breaks is a failed check, with why
            figure, status = f"{type(error).__name__}: {error}".splitlines()[0][:400], "FAIL"
            traceback.print_exc(file=sys.stderr)
        failed += status == "FAIL"
        print(f"{status} {name}: {figure} [{time.perf_counter() - start:.0f} s]", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="*", default=["all"], help="check names or groups; all: every check")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="on CPU, tiny: the checks' CPU-runnable paths"
    )
    parser.add_argument("--list", action="store_true", help="print the groups and their checks")
    args = parser.parse_args(argv)
    groups: dict[str, list[str]] = {}
    for name, (group, _) in CHECKS.items():
        groups.setdefault(group, []).append(name)
    if args.list:
        for group, names in groups.items():
            print(f"{group}: {' '.join(names)}")
        return 0
    names = []
    for item in args.checks:
        if item not in CHECKS and item not in groups and item != "all":
            parser.error(f"unknown check or group {item!r}; --list shows them")
        names += list(CHECKS) if item == "all" else groups.get(item, [item])
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("FAIL setup: no CUDA GPU here (torch.cuda.is_available() is False); --cpu-smoke runs on CPU")
        return 1
    setup = Setup(args.cpu_smoke)
    try:
        return min(run(names, setup), 1)
    finally:
        shutil.rmtree(setup.tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
