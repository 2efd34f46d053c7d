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

CONFIG_DIR = str(Path(__file__).parent / "configs")  # the repository's configs/, shipped in the package
# predict and export take model=<run or bundle>: apart from the training groups (model/, data/ ...)
INFERENCE_CONFIG_DIR = str(Path(CONFIG_DIR) / "inference")

log = logging.getLogger("memetrain")


def _config_groups(*groups: str) -> str:
    """``--help``'s list of a program's own config groups and their options (the configs directory
    holds every program's groups; Hydra's $APP_CONFIG_GROUPS would list them all)."""
    lines = ["== Config groups (group=option) =="]
    for group in groups:
        options = sorted(path.stem for path in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("memetrain_groups", _config_groups, replace=True)


def user_errors_exit(main: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Turn the framework's user-facing errors into one line on stderr and their exit code (2; 3
    when another process of the run died)."""

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
                os._exit(err.exit_code)
            sys.exit(err.exit_code)

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


@hydra.main(config_path=INFERENCE_CONFIG_DIR, config_name="predict", version_base="1.3")
@user_errors_exit
def predict(cfg: DictConfig) -> None:
    """Score new memes with a model bundle (see ``configs/predict.yaml``)."""
    import torch
    from accelerate import PartialState

    from memetrain.bundle import load_model
    from memetrain.predict import gather, metrics, score_shards, score_source, write_predictions

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    model = load_model(cfg.model, device)
    kind = _input_kind(Path(cfg.input)) if cfg.source == "auto" else cfg.source
    splits = list(cfg.splits) if cfg.splits else None
    if kind == "shards":
        if splits is not None and len(splits) != 1:
            raise ConfigError(f"splits={splits}: score one split of a pack at a time (e.g. splits=[test])")
        scored = score_shards(
            model, Path(cfg.input), (splits or ["test"])[0], cfg.batch_size, cfg.num_workers
        )
    else:
        source = _predict_source(kind, cfg, model.targets)
        scored = score_source(model, source, splits, cfg.batch_size, state.process_index, state.num_processes)
    scored = gather(scored)
    if state.is_main_process:
        output = Path(cfg.output)
        rejected = write_predictions(output, model, scored)
        print(f"scored {len(scored.ids)} memes with {model.root}: {output}")
        if rejected is not None:
            print(f"could not score {len(scored.rejected)} (id and reason in {rejected}):")
            for _, key, reason in scored.rejected[:10]:
                print(f"  {key}: {reason}")
        for name, found in metrics(model, scored).items():
            if name == "multilabel":
                print(
                    f"{', '.join(found['labels'])}: weighted F1 {found['f1_weighted_macro']:.4f} (MAMI task B)"
                )
                continue
            auroc = "n/a" if found["auroc"] is None else f"{found['auroc']:.4f}"
            print(
                f"{name}: AUROC {auroc}  accuracy {found['accuracy']:.4f}  F1 macro {found['f1_macro']:.4f}  "
                f"(n={found['num_samples']}, threshold {found['threshold']:.3f})"
            )
    state.wait_for_everyone()


@hydra.main(config_path=INFERENCE_CONFIG_DIR, config_name="export", version_base="1.3")
@user_errors_exit
def export(cfg: DictConfig) -> None:
    """Export a model bundle to ONNX or TorchScript (see ``configs/inference/export.yaml``)."""
    from memetrain.bundle import load_model
    from memetrain.data.stream import MemeStream, StreamSettings
    from memetrain.export import FORMATS
    from memetrain.export import export as run_export

    model = load_model(cfg.model)
    shards = cfg.check_input or model.manifest["source"].get("shards")
    if shards is None or not (Path(shards) / "manifest.json").is_file():
        raise ConfigError(
            f"check_input={shards}: give a pack of memes to check the export on (the run's own pack is not there)"
        )
    settings = StreamSettings(batch_size=cfg.check_memes, shuffle=False, num_workers=0)
    batch = next(iter(MemeStream(shards, cfg.check_split, settings, model.view, model.text_encoder)))
    keep = batch["valid"]
    batch = {k: v[keep] if hasattr(v, "shape") and len(v) == len(keep) else v for k, v in batch.items()}
    output = Path(cfg.output) if cfg.output else model.root / f"model{FORMATS.get(cfg.format, '')}"
    check = run_export(model, cfg.format, output, batch, cfg.tolerance)
    print(
        f"exported {model.root} as {cfg.format}: {check.path} (checked on {check.memes} memes of "
        f"{shards}/{cfg.check_split}: probabilities within {check.max_abs_difference:.1e} of the bundle's)"
    )


def _input_kind(path: Path) -> str:
    """What ``input=`` holds: a pack, Hateful Memes, MAMI, or else a folder with an annotation file."""
    if (path / "manifest.json").is_file():
        return "shards"
    if any((path / f"{name}.jsonl").is_file() for name in ("train", "dev_seen", "test_seen", "test_unseen")):
        return "hateful_memes"
    if (path / "training.csv").is_file() or (path / "Test.csv").is_file():
        return "mami"
    return "folder"


def _predict_source(kind: str, cfg: DictConfig, targets: list[str]):
    """The source that reads ``input`` for predict; a folder's labels are the targets its file has."""
    from memetrain.data.sources import SOURCES, build_source

    if kind not in (*SOURCES, "shards") or kind == "synth":
        raise ConfigError(f"source={kind!r}: choose auto, folder, hateful_memes, mami or shards")
    if not Path(cfg.input).is_dir():
        raise ConfigError(f"input={cfg.input} is not a directory; point it at the memes to score")
    if kind != "folder":
        return build_source(kind, input=cfg.input)
    if cfg.annotations is None:
        raise ConfigError(
            f"{cfg.input} is a folder of memes: name its annotation file (annotations=memes.csv, with columns "
            f"{cfg.id_column}, {cfg.image_column}, {cfg.text_column})"
        )
    columns = dict(id_column=cfg.id_column, image_column=cfg.image_column, text_column=cfg.text_column)
    labels = cfg.label_columns
    if labels is None:
        present = build_source(
            "folder", input=cfg.input, annotations=cfg.annotations, label_columns=[], **columns
        )
        labels = [name for name in targets if name in present.columns()]
    return build_source(
        "folder",
        input=cfg.input,
        annotations=cfg.annotations,
        label_columns=list(labels),
        split="predict",
        **columns,
    )


@hydra.main(config_path=CONFIG_DIR, config_name="sweep", version_base="1.3")
@user_errors_exit
def sweep(cfg: DictConfig) -> None:
    """Run a grid of runs on Slurm or locally, then collect it (see ``configs/sweep.yaml``)."""
    from memetrain.sweep.launch import run_sweep

    run_sweep(cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="fetch_weights", version_base="1.3")
@user_errors_exit
def fetch_weights(cfg: DictConfig) -> None:
    """Fetch the pretrained weights of a run or a sweep into the hub cache (see ``configs/fetch_weights.yaml``)."""
    from memetrain.models.fetch import main

    main(cfg, list(HydraConfig.get().overrides.task))
