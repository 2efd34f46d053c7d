"""Data pipeline benchmark: pack SynthMemes, stream them with MemeStream, compare with three baselines.

    .venv/bin/python benchmarks/data_pipeline.py                  # full run (make bench), recorded
    .venv/bin/python benchmarks/data_pipeline.py --quick          # smoke run, not recorded
    .venv/bin/python benchmarks/data_pipeline.py --quick --record # smoke run, recorded
    .venv/bin/python benchmarks/data_pipeline.py --count 4000 --image-size 384 --workers 4

In a temporary directory: pack memes/s (target >= 400), raw tar read samples/s (context), MemeStream
samples/s to ready batches with worker threads (judged) and with worker processes, baseline A
(open_clip's WebDataset pipeline over the same shards; target: MemeStream >= 2x), baseline C (the
same WebDataset pipeline with MemeStream's decoder, view and output: what a webdataset user would
write with our decode; what the hand-written stream itself is worth) and baseline B (the decode
limit: the stream's own decode and view of the same bytes into batch tensors in a tight loop, in as
many processes; target: MemeStream >= 0.9x; and, for context, B into one reused buffer that never
leaves the cache). Each figure is the median of ``--repeats`` runs after a
warm-up; the streams and the baselines are timed back to back in every run and ratios are medians
of the per-run ratios. The table is printed and appended to
BENCHMARKS.md. See benchmarks/README.md for details.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil  # an Accelerate dependency
import torch
import webdataset as wds
from PIL import Image
from report import machine_info, median, record, spread  # benchmarks/report.py (the script's folder)
from torch.utils.data import DataLoader
from torchvision import transforms as T

from memetrain.data.decode import STORE_ALIGNMENT, Row, cached_rows, decode_rgb
from memetrain.data.manifest import Manifest
from memetrain.data.pack import PackOptions, pack
from memetrain.data.sources.synth import SynthMemes
from memetrain.data.stream import MemeStream, StreamSettings, keep_freed_memory
from memetrain.data.tokenizer import TextEncoder
from memetrain.data.transforms import Resize

SPLIT = "train"
MAX_LENGTH = 32  # tokens per text, as configs/inspect_shards.yaml
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PACK_TARGET = 400.0
STREAM_VS_A_TARGET = 2.0
STREAM_VS_B_TARGET = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="labeled SynthMemes to pack (80%% train)")
    parser.add_argument("--image-size", type=int, default=224, help="pixels of the memes and of the views")
    parser.add_argument("--workers", type=int, default=2, help="pack processes and DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (count 200, repeats 1)")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md even with --quick")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.repeats = min(args.count, 200), 1
    return args


@contextlib.contextmanager
def quiet():
    """Silence stdout and stderr at the file-descriptor level (pack's and the tokenizer trainer's bars)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


# 1. pack -------------------------------------------------------------------------------------


def bench_pack(args: argparse.Namespace, tmp: Path) -> tuple[list[float], Path]:
    """memes/s of whole pack() calls (first one is the warm-up); returns the rates and the last pack."""
    source = SynthMemes(count=args.count, image_size=args.image_size)
    options = PackOptions(workers=args.workers, max_samples_per_shard=args.shard_size, overwrite=True)
    rates, out = [], tmp / "shards"
    for run in range(args.repeats + 1):
        start = time.perf_counter()
        with quiet():
            summary = pack(source, out, options, {"count": args.count, "image_size": args.image_size})
        seconds = time.perf_counter() - start
        if run:  # run 0 warms up imports, fonts and the page cache
            rates.append(sum(summary.written.values()) / seconds)
    return rates, out


# 2. read only --------------------------------------------------------------------------------


def tar_samples(path: Path):
    """(key, {extension: bytes}) per sample of a WebDataset tar, in order; nothing is decoded."""
    key, members = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base, _, extension = info.name.partition(".")
            if base != key and members:
                yield key, members
                members = {}
            key, members[extension] = base, tar.extractfile(info).read()
    if members:
        yield key, members


def bench_read(shard_paths: list[Path], repeats: int) -> list[float]:
    """samples/s of reading the split's tar members into memory, one process, nothing decoded."""
    rates = []
    for _ in range(repeats + 1):
        start, samples = time.perf_counter(), 0
        for path in shard_paths:
            samples += sum(1 for _ in tar_samples(path))
        rates.append(samples / (time.perf_counter() - start))
    return rates[1:]


# 3. MemeStream and 4. baseline A -------------------------------------------------------------


def make_stream(shards: Path, args: argparse.Namespace, encoder: TextEncoder, kind: str) -> MemeStream:
    settings = StreamSettings(batch_size=args.batch_size, num_workers=args.workers, worker_kind=kind)
    return MemeStream(shards, SPLIT, settings, Resize(args.image_size), encoder)


def stream_epoch(stream: MemeStream) -> int:
    """Samples delivered by one epoch (padding excluded)."""
    return sum(int(batch["valid"].sum()) for batch in stream)


class Tokenize:
    """open_clip's ``tokenizer(text)[0]``, with the packed WordPiece tokenizer."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder

    def __call__(self, text: str) -> torch.Tensor:
        ids, _ = self.encoder([text])
        return torch.from_numpy(ids[0])


def webdataset_loader(
    urls: list[str], args: argparse.Namespace, encoder: TextEncoder, decode, transform
) -> DataLoader:
    """open_clip's ``get_wds_dataset`` (without resampling) over the same shards, with ``decode``
    (webdataset's decode stage) and ``transform`` (each image), the same tokenizer per caption,
    ``wds.batched`` collating, and the same (persistent) workers."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(1000),
        decode,
        wds.to_tuple("jpg", "txt", "cls"),
        wds.map_tuple(transform, Tokenize(encoder), int),
        wds.batched(args.batch_size, partial=True),
    )
    return DataLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )


def make_baseline_a(urls: list[str], args: argparse.Namespace, encoder: TextEncoder) -> DataLoader:
    """open_clip's pipeline as it is: PIL decode, bicubic random resized crop, float32 normalised."""
    transform = T.Compose(
        [
            T.RandomResizedCrop(args.image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return webdataset_loader(urls, args, encoder, wds.decode("pilrgb"), transform)


class DecodeView:
    """MemeStream's decode and view of one JPEG: uint8 ``[3, size, size]``."""

    def __init__(self, size: int):
        self.view = Resize(size)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.view(decode_rgb(data, self.view.decode_size))


def make_baseline_c(urls: list[str], args: argparse.Namespace, encoder: TextEncoder) -> DataLoader:
    """The same pipeline with MemeStream's decoder, view and output (uint8 images, normalised on the
    device); ``wds.decode()`` without an image handler turns only the text and label into values."""
    return webdataset_loader(urls, args, encoder, wds.decode(), DecodeView(args.image_size))


def webdataset_epoch(loader: DataLoader) -> int:
    return sum(len(labels) for _, _, labels in loader)


# 5. baseline B: the decode limit -------------------------------------------------------------

_images: list[bytes] = []
_view: Resize | None = None
_batch_size = 0


def _init_decoder(images: list[bytes], size: int, batch_size: int) -> None:
    global _images, _view, _batch_size
    _images, _view, _batch_size = images, Resize(size), batch_size
    keep_freed_memory()  # as in the stream's workers: the limit is the decode, not page faults


def _decode_range(bounds: tuple[int, int]) -> int:
    """The stream's own decode and view (same calls, same tensors) of each image, into its row of
    a batch tensor as the stream delivers them (uint8, channels last), nothing else."""
    size = _view.size
    for start in range(bounds[0], bounds[1], _batch_size):
        images = _images[start : min(start + _batch_size, bounds[1])]
        shape = (len(images), size, size, 3)
        batch = cached_rows(
            torch.empty(math.prod(shape) + STORE_ALIGNMENT, dtype=torch.uint8).untyped_storage(), shape
        )
        for data, pixels, row in zip(images, batch.numpy(), batch.permute(0, 3, 1, 2)):
            view = _view(decode_rgb(data, _view.decode_size, Row(pixels, row)))
            if view is not row:
                row.copy_(view)
    return bounds[1] - bounds[0]


def _decode_range_in_cache(bounds: tuple[int, int]) -> int:
    """The same decode and view, each image into memory that is freed and reused for the next one:
    its pixels never leave the CPU's cache (a stricter limit than any batch can meet)."""
    for data in _images[bounds[0] : bounds[1]]:
        _view(decode_rgb(data, _view.decode_size))
    return bounds[1] - bounds[0]


def split_images(shard_paths: list[Path]) -> dict[str, bytes]:
    return {key: members["jpg"] for path in shard_paths for key, members in tar_samples(path)}


def check_same_tensors(shards: Path, images: dict[str, bytes], size: int) -> None:
    """Baseline B must produce exactly the images the stream delivers, or the ratio means nothing."""
    view = Resize(size)
    batch = next(iter(MemeStream(shards, SPLIT, StreamSettings(batch_size=64, num_workers=0), view)))
    for key, image in zip(batch["id"], batch["image"]):
        if not torch.equal(view(decode_rgb(images[key], view.decode_size)), image):
            raise SystemExit(f"baseline B decodes {key} differently from MemeStream: fix the benchmark")


def decode_pass(pool: multiprocessing.pool.Pool, count: int, workers: int, decode=_decode_range) -> int:
    step = math.ceil(count / (8 * max(1, workers)))
    return sum(pool.map(decode, [(i, min(i + step, count)) for i in range(0, count, step)]))


# timing and report ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process (all its threads, also those that have ended: worker threads end
    with each epoch) and of all its children so far (loader workers, pool processes), from the
    scheduler's nanosecond runtime of each of their threads where Linux shows it; psutil's
    clock-tick times (10 ms apiece, a tenth of a stream epoch here) otherwise."""
    total = time.process_time()
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            runtime = _scheduler_runtime(process.pid)
            if runtime is None:
                times = process.cpu_times()
                runtime = times.user + times.system
            total += runtime
    return total


def _scheduler_runtime(pid: int) -> float | None:
    """Seconds on a CPU of every thread of ``pid`` (``se.sum_exec_runtime`` in /proc/<pid>/task/*/sched)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    total = 0.0
    for task in tasks:
        try:
            lines = (task / "sched").read_text().splitlines()
        except FileNotFoundError:
            continue  # the thread has just ended
        except OSError:
            return None
        runtime = next((line for line in lines if line.startswith("se.sum_exec_runtime")), None)
        if runtime is None:
            return None
        total += float(runtime.split(":")[1]) / 1e3  # milliseconds
    return total


def timed(epoch, *args) -> tuple[float, float]:
    """samples/s of one call of ``epoch`` (which returns the samples it saw), and its CPU
    microseconds per sample over every process: a ratio of those is unmoved by a busy machine."""
    start, cpu = time.perf_counter(), cpu_seconds()
    samples = epoch(*args)
    return samples / (time.perf_counter() - start), (cpu_seconds() - cpu) / samples * 1e6


RUNS = ("stream", "processes", "a", "c", "b", "b_cache")


def bench_streams(shards: Path, shard_paths: list[Path], args: argparse.Namespace) -> dict[str, list[float]]:
    """MemeStream (worker threads, worker processes), baselines A, C and B (into batches, in the
    cache), one warm-up each, then interleaved timed runs."""
    manifest = Manifest.load(shards)
    encoder = TextEncoder(manifest.root / manifest.tokenizer, MAX_LENGTH)
    stream = make_stream(shards, args, encoder, "thread")
    processes = make_stream(shards, args, encoder, "process")
    loader = make_baseline_a([str(p) for p in shard_paths], args, encoder)
    same_decoder = make_baseline_c([str(p) for p in shard_paths], args, encoder)
    images = split_images(shard_paths)
    check_same_tensors(shards, images, args.image_size)
    images = list(images.values())
    runs: dict[str, list[float]] = {f"{name}{cpu}": [] for name in RUNS for cpu in ("", "_cpu")}
    setup = (images, args.image_size, args.batch_size)
    with multiprocessing.Pool(max(1, args.workers), _init_decoder, setup) as pool:
        for run in range(args.repeats + 1):  # run 0 starts the workers and warms the caches
            rates = {
                "stream": timed(stream_epoch, stream),
                "processes": timed(stream_epoch, processes),
                "a": timed(webdataset_epoch, loader),
                "c": timed(webdataset_epoch, same_decoder),
                "b": timed(decode_pass, pool, len(images), args.workers),
                "b_cache": timed(decode_pass, pool, len(images), args.workers, _decode_range_in_cache),
            }
            for name, (rate, cpu) in rates.items():
                runs[name] += [rate] if run else []
                runs[f"{name}_cpu"] += [cpu] if run else []
    del loader, same_decoder, stream, processes  # shuts the persistent workers down
    return runs


def row(name: str, rates: list[float], unit: str, ratio: str = "", target: str = "", cpu: str = "") -> str:
    return f"| {name} | {median(rates):.0f} {unit} | {spread(rates)} | {cpu} | {ratio} | {target} |"


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, theirs))


def build_table(args: argparse.Namespace, pack_rates, read_rates, runs, train_samples: int) -> str:
    w, s = args.workers, args.image_size
    pack_ratio = statistics.median(pack_rates) / PACK_TARGET
    vs = {base: paired_ratio(runs["stream"], runs[base]) for base in ("a", "c", "b", "b_cache")}

    def cpu(name: str) -> str:
        return f"{median(runs[f'{name}_cpu']):.0f} µs"

    def ratios(base: str, label: str) -> str:
        processes = paired_ratio(runs["processes"], runs[base])
        cpu_time = paired_ratio(runs[f"{base}_cpu"], runs["stream_cpu"])
        return f"threads / {label} = {vs[base]:.2f}x (CPU time: {cpu_time:.2f}x); processes / {label} = {processes:.2f}x"

    def target(value: float, goal: float) -> str:
        return f">= {goal:g}x ({'met' if value >= goal else 'not met'})"

    lines = [
        "| benchmark | median | spread (min–max) | CPU per sample | ratio | target |",
        "|---|---|---|---|---|---|",
        row(
            f"pack {args.count} SynthMemes, {s} px, {w} processes",
            pack_rates,
            "memes/s",
            f"{pack_ratio:.2f}x target",
            f">= {PACK_TARGET:.0f} memes/s ({'met' if pack_ratio >= 1 else 'not met'})",
        ),
        row(f"read only: raw tar read of {SPLIT}, 1 process", read_rates, "samples/s"),
        row(
            f"MemeStream: Resize({s}) + tokens, {w} worker threads",
            runs["stream"],
            "samples/s",
            cpu=cpu("stream"),
        ),
        row(f"MemeStream, {w} worker processes", runs["processes"], "samples/s", cpu=cpu("processes")),
        row(
            f"baseline A: open_clip WebDataset pipeline, {w} workers",
            runs["a"],
            "samples/s",
            ratios("a", "A"),
            target(vs["a"], STREAM_VS_A_TARGET),
            cpu("a"),
        ),
        row(
            f"baseline C: WebDataset with MemeStream's decode (decode_rgb + Resize, uint8), {w} workers",
            runs["c"],
            "samples/s",
            ratios("c", "C"),
            "none: what the hand-written stream adds",
            cpu("c"),
        ),
        row(
            f"baseline B: decode limit (decode_rgb + Resize into batch tensors), {w} processes",
            runs["b"],
            "samples/s",
            ratios("b", "B"),
            target(vs["b"], STREAM_VS_B_TARGET),
            cpu("b"),
        ),
        row(
            f"context: B with each image in cache-resident memory, {w} processes",
            runs["b_cache"],
            "samples/s",
            ratios("b_cache", "B in cache"),
            cpu=cpu("b_cache"),
        ),
    ]
    return "\n".join(lines) + (
        f"\n\n{train_samples} {SPLIT} samples in shards of {args.shard_size}, batch {args.batch_size}, "
        f"{args.repeats} timed runs after a warm-up; ratios are of samples/s, the target is judged on "
        "wall time with worker threads; the CPU-time ratio (CPU per sample of the other over MemeStream's "
        "with threads, all processes) is what the same work costs whatever else runs on the machine"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info(webdataset=wds.__version__, Pillow=Image.__version__)
    print(f"machine: {info}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memetrain-bench-") as tmp:
        pack_rates, shards = bench_pack(args, Path(tmp))
        manifest = Manifest.load(shards)
        shard_paths = [manifest.shard_path(shard) for shard in manifest.split(SPLIT).shards]
        read_rates = bench_read(shard_paths, args.repeats)
        runs = bench_streams(shards, shard_paths, args)
        table = build_table(args, pack_rates, read_rates, runs, manifest.split(SPLIT).samples)
    print(f"\n{table}\n\n({time.perf_counter() - start:.0f} s in all)")
    if not args.quick or args.record:
        record("Data pipeline", info, table)


if __name__ == "__main__":
    main()
