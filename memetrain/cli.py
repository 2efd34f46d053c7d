"""Command-line entry points (Hydra apps over ``configs/``); ``launcher/*.py`` and the console
scripts both call these. User errors end in one ``error:`` line and exit code 2, not a traceback."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from memetrain.errors import ConfigError, MemetrainError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

log = logging.getLogger("memetrain")


def user_errors_exit(main: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Turn the framework's user-facing errors into one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(cfg: DictConfig) -> None:
        try:
            main(cfg)
        except MemetrainError as err:
            print(f"error: {err}", file=sys.stderr)
            if not err.safe_teardown:
                logging.shutdown()  # flushes the run's log files
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            sys.exit(2)

    return wrapped


class WritableRunDir(Callback):
    """Hydra callback (``hydra.callbacks`` in the configs): an output directory that cannot be
    written is one ``error:`` line and exit code 2. Hydra creates it before the task runs and would
    report a failure there as its own traceback."""

    def __init__(self, option: str):
        self.option = option  # what the user sets to choose the directory

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # hydra.run.dir interpolates ${hydra:...}
        directory = Path(config.hydra.run.dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as err:
            print(
                f"error: cannot write to {directory} ({err.strerror}); set {self.option} to a writable directory",
                file=sys.stderr,
            )
            sys.exit(2)


@hydra.main(config_path=CONFIG_DIR, config_name="pack", version_base="1.3")
@user_errors_exit
def pack(cfg: DictConfig) -> None:
    """Pack a source into WebDataset shards (see ``configs/pack.yaml``)."""
    from memetrain.data.pack import PackOptions
    from memetrain.data.pack import pack as run_pack
    from memetrain.data.sources import SOURCES, build_source

    reserved = {"source", "output", "strict", "overwrite", "workers", "shard", "image", "tokenizer"}
    source_options = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in reserved}
    if cfg.source not in SOURCES:
        raise ConfigError(f"unknown source {cfg.source!r}; choose one of {', '.join(sorted(SOURCES))}")
    if "input" in source_options and not Path(source_options["input"]).is_dir():
        raise ConfigError(
            f"input={source_options['input']} is not a directory; point it at the {cfg.source} data"
        )
    source = build_source(cfg.source, **source_options)
    options = PackOptions(
        max_samples_per_shard=cfg.shard.max_samples,
        max_bytes_per_shard=cfg.shard.max_bytes,
        resize_longest=cfg.image.resize_longest,
        image_format=cfg.image.format,
        jpeg_quality=cfg.image.jpeg_quality,
        workers=cfg.workers,
        strict=cfg.strict,
        tokenizer_vocab_size=cfg.tokenizer.vocab_size,
        overwrite=cfg.overwrite,
    )
    summary = run_pack(source, cfg.output, options, source_options)
    if summary.skipped:
        print(f"{cfg.output} already holds this pack; nothing to do (overwrite=true redoes it)")
        return
    written = ", ".join(f"{split} {count}" for split, count in sorted(summary.written.items()))
    print(
        f"packed {sum(summary.written.values())} memes ({written}) into {cfg.output} "
        f"in {summary.seconds:.1f} s ({summary.memes_per_second:.0f} memes/s)"
    )
    if summary.rejected:
        print(
            f"rejected {len(summary.rejected)} (all listed under 'rejected' in {cfg.output}/manifest.json):"
        )
        for item in summary.rejected[:10]:
            print(f"  {item['split'] or '-'} / {item['id']}: {item['reason']}")
        if len(summary.rejected) > 10:
            print(f"  ... and {len(summary.rejected) - 10} more")


@hydra.main(config_path=CONFIG_DIR, config_name="inspect_shards", version_base="1.3")
@user_errors_exit
def inspect_shards(cfg: DictConfig) -> None:
    """Stream a split once: counts, label balance, throughput, and a grid of the first batch."""
    import time

    import torch
    from torchvision.utils import save_image

    from memetrain.data.manifest import Manifest
    from memetrain.data.stream import MemeStream, StreamSettings
    from memetrain.data.tokenizer import TextEncoder
    from memetrain.data.transforms import Resize

    manifest = Manifest.load(cfg.shards)
    info = manifest.split(cfg.split)
    print(
        f"{cfg.shards}: source {manifest.source}, splits "
        + ", ".join(f"{name} {split.samples}" for name, split in manifest.splits.items())
        + f"; {len(manifest.rejected)} rejected at pack time"
    )
    print(
        f"{cfg.split}: {len(info.shards)} shards, labels {info.label_histogram}, {info.unlabeled} unlabeled"
    )
    encoder = TextEncoder(manifest.root / manifest.tokenizer, cfg.max_length) if manifest.tokenizer else None
    settings = StreamSettings(batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    stream = MemeStream(cfg.shards, cfg.split, settings, Resize(cfg.image_size), encoder)
    start, samples, label_counts = time.perf_counter(), 0, torch.zeros(3, dtype=torch.long)
    for index, batch in enumerate(stream):
        samples += int(batch["valid"].sum())
        label_counts += torch.bincount(batch["label"][batch["valid"]] + 1, minlength=3)
        if index == 0 and cfg.grid:
            save_image(batch["image"].float() / 255, cfg.grid, nrow=8)
            print(
                f"first batch: {tuple(batch['image'].shape)} uint8 images, tokens {tuple(batch['input_ids'].shape)}"
                if encoder
                else f"first batch: {tuple(batch['image'].shape)} uint8 images"
            )
            print(f"  text[0]: {batch['text'][0]!r}")
    seconds = time.perf_counter() - start
    unlabeled, benign, harmful = label_counts.tolist()
    print(
        f"streamed {samples} samples in {len(stream)} batches, {seconds:.1f} s ({samples / seconds:.0f} samples/s, "
        f"{cfg.num_workers} workers); {manifest.main_label}: 0={benign} 1={harmful} unlabeled={unlabeled}; "
        f"{stream.bad_samples} bad samples"
    )
    if cfg.grid:
        print(f"grid of the first batch: {cfg.grid}")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@user_errors_exit
def train(cfg: DictConfig) -> None:
    """Train and evaluate one run (see ``configs/train.yaml``). Stopped by SIGTERM or SIGUSR2, it
    checkpoints and exits with code 75 (``STOPPED_EXIT_CODE``); the same command resumes."""
    from hydra.core.hydra_config import HydraConfig

    from memetrain.errors import STOPPED_EXIT_CODE, TrainingStopped
    from memetrain.run import train_and_evaluate

    try:
        train_and_evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)


@hydra.main(config_path=CONFIG_DIR, config_name="collect", version_base="1.3")
@user_errors_exit
def _collect(cfg: DictConfig) -> None:
    from memetrain.sweep.collect import OUTPUTS, collect_sweep

    if cfg.sweep_dir is None:
        raise ConfigError(
            "give the sweep directory: python launcher/collect.py runs/sweeps/<sweep> (or runs/synth)"
        )
    print(collect_sweep(Path(cfg.sweep_dir), cfg.reference, cfg.protocol, cfg.split), end="")
    print(f"\nwritten: {', '.join(str(Path(cfg.sweep_dir) / name) for name in OUTPUTS)}")


def collect() -> None:
    """Collect a sweep into mean ± std tables (see ``configs/collect.yaml``).

    ``collect.py <dir> key=value ...`` reads as ``collect.py sweep_dir=<dir> key=value ...``: the
    directory may come first, as a plain argument, like a path to any other tool."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        quoted = args[0].replace("\\", "\\\\").replace("'", "\\'")
        sys.argv[1:] = [f"sweep_dir='{quoted}'", *args[1:]]
    _collect()


@hydra.main(config_path=CONFIG_DIR, config_name="sweep", version_base="1.3")
@user_errors_exit
def sweep(cfg: DictConfig) -> None:
    """Run a grid of runs on Slurm or locally, then collect it (see ``configs/sweep.yaml``)."""
    from memetrain.sweep.launch import run_sweep

    run_sweep(cfg)
