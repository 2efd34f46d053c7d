"""One run, top to bottom: set up processes, data and method; train; evaluate; write results.

Everything here reads its own part of the resolved config (``configs/train.yaml``); the engine,
the data layer and the evaluation protocols never see the rest.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from memetrain.data.manifest import Manifest
from memetrain.data.semi_supervised import SemiSupervisedStream
from memetrain.data.stream import MemeStream, StreamSettings, split_labels
from memetrain.data.tokenizer import TextEncoder
from memetrain.data.transforms import Resize, build_view
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.distributed import (
    build_accelerator,
    env_from_slurm,
    leave_after_failure,
    shutdown,
    world_size,
)
from memetrain.engine.logger import RunLogger
from memetrain.engine.model_options import apply_trainer_options
from memetrain.engine.optim import build_optimizer
from memetrain.engine.provenance import provenance
from memetrain.engine.trainer import Trainer, TrainerSettings, accumulation_steps
from memetrain.errors import ConfigError
from memetrain.eval.fractions import label_fraction_indices
from memetrain.eval.plots import plot_curves
from memetrain.eval.protocols import run_protocols
from memetrain.fileio import atomic_write_json, atomic_write_text
from memetrain.methods import DataInfo, Stage, build_method

log = logging.getLogger("memetrain")


def train_and_evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` with ``cfg.trainer``, evaluate with ``cfg.eval``.

    Returns the content of ``results.json`` (on every rank; only rank 0 writes files).
    """
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r}: give an integer (config values are data, never evaluated)")
    from_slurm = env_from_slurm()  # a task started by srun or submitit: RANK, WORLD_SIZE ... from SLURM_*
    accumulation = accumulation_steps(cfg.trainer.global_batch_size, cfg.data.batch_size, world_size())
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    accelerator = build_accelerator(trainer_options, cfg.data.batch_size, accumulation)
    main = accelerator.is_main_process
    try:
        _setup_logging(run_dir, main)
        if from_slurm and main:
            log.info("processes from Slurm: %s", " ".join(f"{k}={v}" for k, v in from_slurm.items()))
        set_seed(cfg.seed, device_specific=True)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", config_yaml)
            atomic_write_json(run_dir / "provenance.json", provenance(accelerator.num_processes, cfg.seed))

        data = cfg.data
        manifest = Manifest.load(data.shards)
        encoder = _text_encoder(data, manifest)
        info = DataInfo(
            label_names=manifest.label_names,
            main_label=manifest.main_label,
            vocab_size=encoder.vocab_size if encoder else None,
            pad_id=encoder.pad_id if encoder else 0,
        )
        method_options = OmegaConf.to_container(cfg.method, resolve=True)
        name, view = method_options.pop("name"), method_options.pop("view")
        method = build_method(name, method_options, OmegaConf.to_container(cfg.model, resolve=True), info)
        if "classifier" in cfg.eval.protocols and not method.classifies:
            raise ConfigError(
                f"method {name} does not classify: evaluate it with eval=probe (linear probe, kNN)"
            )
        stages = method.stages(cfg.trainer.max_steps)
        scalars = apply_trainer_options(method, trainer_options, len(stages))
        _check_splits(data, manifest, label_free=any(stage.reads_unlabeled for stage in stages))
        targets = _targets(data, manifest)
        stage_dirs = [run_dir if len(stages) == 1 else run_dir / "stages" / s.name for s in stages]
        checkpointers = [
            Checkpointer(d / "checkpoints", cfg.trainer.keep_checkpoints, accelerator, scalars)
            for d in stage_dirs
        ]
        for checkpointer in checkpointers:
            _check_resume(cfg.resume, checkpointer)
        val_stream = (
            _stream(data, data.dev_split, Resize(data.image_size), encoder, cfg.seed)
            if data.dev_split
            else None
        )
        t = cfg.trainer
        steps = skipped = 0
        for stage, stage_dir, checkpointer in zip(stages, stage_dirs, checkpointers):
            method.start_stage(stage)
            train_stream = _train_stream(data, manifest, stage, build_view(**view), encoder, cfg.seed)
            if stage is not stages[0]:
                accelerator.free_memory()  # the previous stage's wrapped model and optimizer
            optimizer = build_optimizer(
                method.param_groups(t.weight_decay), trainer_options, accelerator.device
            )
            model, optimizer = accelerator.prepare(method, optimizer)
            fields = {f: t[f] for f in TrainerSettings.__dataclass_fields__}
            settings = TrainerSettings(**{**fields, "max_steps": stage.steps})
            trainer = Trainer(
                settings, accelerator, model, optimizer, train_stream, checkpointer, config_yaml, val_stream
            )
            if main:
                log.info(
                    "run %s: %s%s on %s (%d train memes), %d process(es) x batch %d x %d accumulation = %d per step",
                    run_dir, name, "" if len(stages) == 1 else f" stage {stage.name}", train_stream.split,
                    train_stream.num_samples,
                    accelerator.num_processes, data.batch_size, accumulation, t.global_batch_size,
                )  # fmt: skip
            state = trainer.fit(lambda step, d=stage_dir: RunLogger(d, main, step))
            steps, skipped = steps + state.step, skipped + state.skipped_steps
            if stage is not stages[-1]:
                trainer.logger.close()

        eval_streams = {
            split: _stream(data, split, Resize(data.image_size), encoder, cfg.seed)
            for split in data.eval_splits
        }
        probes = {"linear_probe", "knn"} & set(cfg.eval.protocols)
        probe_stream = (
            _stream(
                data,
                data.train_split,
                Resize(data.image_size),
                encoder,
                cfg.seed,
                False,
                _labeled_subset(data, manifest, cfg.seed),
            )
            if probes
            else None
        )
        protocols = run_protocols(
            trainer.method,
            list(cfg.eval.protocols),
            eval_streams,
            probe_stream,
            accelerator,
            run_dir,
            dev_split=data.dev_split,
            label_fraction=data.label_fraction,
            main_label=manifest.main_label,
            label_names=manifest.label_names,
            targets=targets,
            seed=cfg.seed,
            knn_k=cfg.eval.knn_k,
            tsne=cfg.eval.tsne,
        )
        results = {
            "method": name,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": {"shards": data.shards, "source": manifest.source, "label_fraction": data.label_fraction},
            "seed": cfg.seed,
            "steps": steps,
            "skipped_steps": skipped,
            "world_size": accelerator.num_processes,
            "protocols": protocols,
        }
        if main:
            atomic_write_json(run_dir / "results.json", results)
            plot_curves(trainer.logger.history(), run_dir / "plots" / "curves.png")
            trainer.logger.hparams(_hparams(cfg), _headline(protocols))
            _print_summary(run_dir, protocols)
        trainer.logger.close()
        return results
    except BaseException as error:
        leave_after_failure(error)  # without waiting for the other ranks; PeerFailure if one died
        raise
    finally:
        shutdown()


def _train_stream(
    data: DictConfig, manifest: Manifest, stage: Stage, view, encoder: TextEncoder | None, seed: int
) -> MemeStream | SemiSupervisedStream:
    """What ``stage`` trains on: the labeled fraction, every meme (label-free), or both in each batch."""
    everything = [data.train_split, *data.unlabeled_splits]
    if not stage.needs_labels:
        return _stream(data, everything, view, encoder, seed, True)
    labeled = _stream(
        data, data.train_split, view, encoder, seed, True, _labeled_subset(data, manifest, seed)
    )
    if stage.unlabeled_ratio == 0:
        return labeled
    batch_size = max(1, round(stage.unlabeled_ratio * data.batch_size))
    return SemiSupervisedStream(
        labeled, _stream(data, everything, view, encoder, seed, True, batch_size=batch_size)
    )


def _stream(
    data: DictConfig,
    split: str | list[str],
    view,
    encoder: TextEncoder | None,
    seed: int,
    train: bool = False,
    subset: np.ndarray | None = None,
    batch_size: int | None = None,
) -> MemeStream:
    """Training streams shuffle and drop the last partial batch; evaluation streams see every meme once."""
    settings = StreamSettings(
        batch_size=batch_size or data.batch_size,
        seed=seed,
        shuffle=train,
        shuffle_buffer=data.shuffle_buffer,
        drop_last=train,
        num_workers=data.num_workers,
        worker_kind=data.worker_kind,
        pin_memory=torch.cuda.is_available(),
        max_bad_samples=data.max_bad_samples,
        verify_checksums=data.verify_checksums,
    )
    return MemeStream(data.shards, split, settings, view, encoder, subset=subset)


def _check_splits(data: DictConfig, manifest: Manifest, label_free: bool) -> None:
    """Every split the run reads must be in the pack (the unlabeled ones only if a stage trains
    without labels), or the run stops before training."""
    named = {
        "data.train_split": [data.train_split],
        "data.dev_split": [data.dev_split] if data.dev_split else [],
        "data.eval_splits": list(data.eval_splits),
        "data.unlabeled_splits": list(data.unlabeled_splits) if label_free else [],
    }
    for option, splits in named.items():
        missing = [split for split in splits if split not in manifest.splits]
        if missing:
            hint = (
                " or [] (for SynthMemes, pack with unlabeled=N)" if option == "data.unlabeled_splits" else ""
            )
            raise ConfigError(
                f"{option} names {missing}, which the pack at {manifest.root} does not have (it has "
                f"{', '.join(manifest.splits)}); set {option} to splits it has{hint}"
            )


def _targets(data: DictConfig, manifest: Manifest) -> list[str]:
    """``data.targets``: the label columns probes fit and classifiers predict (the main label if null)."""
    targets = list(data.targets or [manifest.main_label])
    unknown = [name for name in targets if name not in manifest.label_names]
    if unknown or len(set(targets)) != len(targets):
        raise ConfigError(
            f"data.targets={targets}: each must be one label of the pack at {manifest.root}, once "
            f"(it has {', '.join(manifest.label_names)}); MAMI task B is data=mami_task_b"
        )
    return targets


def _labeled_subset(data: DictConfig, manifest: Manifest, seed: int) -> np.ndarray:
    """The training memes whose labels a supervised objective may use: ``label_fraction`` of the
    labeled ones, stratified and nested across fractions (the 5 % set is inside the 10 % set)."""
    labels = split_labels(data.shards, data.train_split)[:, manifest.label_names.index(manifest.main_label)]
    return label_fraction_indices(labels, data.label_fraction, seed)


def _text_encoder(data: DictConfig, manifest: Manifest) -> TextEncoder | None:
    path = data.tokenizer or (manifest.root / manifest.tokenizer if manifest.tokenizer else None)
    return TextEncoder(path, data.max_length, clean=data.clean_text) if path else None


def _check_resume(resume: str, checkpointer: Checkpointer) -> None:
    if resume not in ("auto", "never"):
        raise ConfigError(f"resume={resume!r}: choose auto (continue from the newest checkpoint) or never")
    if resume == "never" and checkpointer.latest() is not None:
        raise ConfigError(
            f"resume=never but {checkpointer.directory} holds checkpoints; use resume=auto to continue, or "
            "another hydra.run.dir to start over"
        )


def _setup_logging(run_dir: Path, main: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if main else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file saved is noise here
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
        root.addHandler(file)


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    return {
        "method": cfg.method.name,
        "seed": cfg.seed,
        "lr": cfg.trainer.lr,
        "global_batch_size": cfg.trainer.global_batch_size,
        "max_steps": cfg.trainer.max_steps,
        "label_fraction": cfg.data.label_fraction,
        "image_size": cfg.data.image_size,
    }


def _headline(protocols: dict[str, Any]) -> dict[str, float]:
    """Final metrics for TensorBoard's hparams view: the main label's AUROC, accuracy and F1 per
    protocol and split, and the multi-label weighted F1 and mean AUROC."""
    out = {}
    for protocol, result in protocols.items():
        for split, metrics in result["splits"].items():
            for name in ("auroc", "accuracy", "f1_macro"):
                if metrics.get(name) is not None:
                    out[f"hparams/{protocol}/{split}/{name}"] = metrics[name]
        for split, metrics in result.get("multilabel", {}).items():
            for name in ("f1_weighted_macro", "auroc"):
                if metrics.get(name) is not None:
                    out[f"hparams/{protocol}/{split}/multilabel_{name}"] = metrics[name]
    return out


def _print_summary(run_dir: Path, protocols: dict[str, Any]) -> None:
    for protocol, result in protocols.items():
        for split, metrics in result["splits"].items():
            if "accuracy" in metrics:
                auroc = metrics["auroc"]
                print(
                    f"{protocol:>12} {split:>10}: AUROC {auroc:.4f} "
                    if auroc is not None
                    else f"{protocol:>12} {split:>10}: AUROC n/a ",
                    f"accuracy {metrics['accuracy']:.4f}  F1 macro {metrics['f1_macro']:.4f}  (n={metrics['num_samples']}, "
                    f"threshold {result['threshold']:.3f} from {result['threshold_source']})",
                    sep="",
                )
            else:
                print(f"{protocol:>12} {split:>10}: {metrics['note']}")
        for split, metrics in result.get("multilabel", {}).items():
            if "per_label" not in metrics:
                print(f"{protocol:>12} {split:>10}: {metrics['note']}")
                continue
            auroc = "n/a" if metrics["auroc"] is None else f"{metrics['auroc']:.4f}"
            print(
                f"{protocol:>12} {split:>10}: {', '.join(metrics['labels'])}: weighted F1 "
                f"{metrics['f1_weighted_macro']:.4f} (MAMI task B)  mean AUROC {auroc}"
            )
    print(
        f"results: {run_dir / 'results.json'}; plots: {run_dir / 'plots'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}"
    )
