"""One run, top to bottom: set up processes, data and method; train; evaluate; write results.

Everything here reads its own part of the resolved config (``configs/train.yaml``); the engine,
the data layer and the evaluation protocols never see the rest.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from memetrain.bundle import (
    BUNDLE_DIR,
    BundleContents,
    choose_head,
    method_tensors,
    probe_tensors,
    write_bundle,
)
from memetrain.data.transforms import Resize, build_view
from memetrain.engine.checkpoint import WEIGHTS, Checkpointer, checkpoint_step, complete_checkpoints
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
from memetrain.engine.trainer import (
    Trainer,
    TrainerSettings,
    accumulation_steps,
    per_process_batch,
)
from memetrain.errors import ConfigError
from memetrain.eval.plots import plot_curves
from memetrain.eval.protocols import check_attribute_targets, run_protocols
from memetrain.eval.validation import Validation
from memetrain.eval.zero_shot import ZeroShotSettings
from memetrain.fileio import atomic_write_json, atomic_write_text
from memetrain.methods import DataInfo, build_method
from memetrain.methods.base import Method
from memetrain.models.hub import image_preprocessing, pretrained_weights, resize_interpolation
from memetrain.models.text import LSTMTextEncoder, TransformerTextEncoder
from memetrain.run_data import RunData
from memetrain.run_record import (
    CONFIG_FILE,
    check_same_config,
    holds_a_run,
    holds_results,
    read_config,
    run_ways_out,
    set_aside,
)

log = logging.getLogger("memetrain")


def train_and_evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` with ``cfg.trainer``, evaluate with ``cfg.eval``.

    Returns the content of ``results.json`` (on every rank; only rank 0 writes files).
    """
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed={cfg.seed!r}: give an integer (config values are data, never evaluated)")
    from_slurm = env_from_slurm()  # a task started by srun or submitit: RANK, WORLD_SIZE ... from SLURM_*
    # the config as given is the run's record; how this launch split the batch goes to provenance.json
    config, config_yaml = OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_yaml(cfg, resolve=True)
    batch_size = per_process_batch(cfg.trainer.global_batch_size, cfg.data.batch_size, world_size())
    requested_batch_size, cfg.data.batch_size = cfg.data.batch_size, batch_size
    accumulation = accumulation_steps(cfg.trainer.global_batch_size, batch_size, world_size())
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    accelerator = build_accelerator(
        trainer_options, batch_size, accumulation, rendezvous_timeout_s=cfg.trainer.rendezvous_timeout_s
    )
    main = accelerator.is_main_process
    try:
        _claim_run_dir(run_dir, config, cfg.resume, accelerator)
        _setup_logging(run_dir, main)
        if from_slurm and main:
            log.info("processes from Slurm: %s", " ".join(f"{k}={v}" for k, v in from_slurm.items()))
        if batch_size != requested_batch_size and main:
            log.info(
                "data.batch_size=%d x %d processes exceeds trainer.global_batch_size=%d: %d per process",
                requested_batch_size, world_size(), cfg.trainer.global_batch_size, batch_size,
            )  # fmt: skip
        set_seed(cfg.seed, device_specific=True)  # deterministic algorithms: build_accelerator

        data = cfg.data
        run_data = RunData(data, cfg.seed)
        manifest, encoder = run_data.manifest, run_data.encoder
        info = DataInfo(
            label_names=manifest.label_names,
            main_label=manifest.main_label,
            vocab_size=encoder.vocab_size if encoder else None,
            pad_id=encoder.pad_id if encoder else 0,
        )
        method_options = OmegaConf.to_container(cfg.method, resolve=True)
        name, view = method_options.pop("name"), method_options.pop("view")
        method = build_method(name, method_options, OmegaConf.to_container(cfg.model, resolve=True), info)
        _check_vocabulary(method, encoder, data.tokenizer)
        interpolation = resize_interpolation(data.interpolation, method)
        eval_view = Resize(data.image_size, interpolation)
        if "classifier" in cfg.eval.protocols and not method.classifies:
            raise ConfigError(
                f"method {name} does not classify: evaluate it with eval=probe (linear probe, kNN)"
            )
        stages = method.stages(cfg.trainer.max_steps)
        scalars = apply_trainer_options(method, trainer_options, len(stages))
        run_data.check_splits(stages)
        targets = run_data.targets()
        stage_dirs = [run_dir if len(stages) == 1 else run_dir / "stages" / s.name for s in stages]
        t = cfg.trainer
        checkpointers = [
            Checkpointer(d / "checkpoints", cfg.trainer.keep_checkpoints, accelerator, scalars)
            for d in stage_dirs
        ]
        threshold = _check_evaluation_options(cfg)
        attributes = check_attribute_targets(list(cfg.eval.targets), manifest.label_names)
        zero_shot = ZeroShotSettings(**OmegaConf.to_container(cfg.eval.zero_shot, resolve=True))
        # each stage's recipe (its paper's optimiser and schedule) over the run's trainer options
        stage_options = [stage.trainer_options(trainer_options) for stage in stages]
        settings = [
            _trainer_settings(options, stage.steps, evaluated=stage is stages[-1])
            for stage, options in zip(stages, stage_options)
        ]
        if trainer_options["strategy"] == "deepspeed":
            _check_clipping_under_deepspeed(method)
        starts = _resume_points(cfg.resume, checkpointers, config, run_dir)
        if main:  # the run directory is this config's from here on
            launch = {"per_process_batch": batch_size, "accumulation_steps": accumulation}
            _record_run(run_dir, cfg, config_yaml, method, accelerator.num_processes, launch)
        validation = (
            Validation(
                run_data.stream(data.dev_split, eval_view),
                manifest.label_names,
                manifest.main_label,
                monitors=list(cfg.eval.online),
                bank=run_data.monitor_bank(eval_view, cfg.eval.online_bank) if cfg.eval.online else None,
                knn_k=cfg.eval.knn_k,
                seed=cfg.seed,
            )
            if data.dev_split
            else None
        )
        if any(stage.needs_labels for stage in stages):  # label statistics some losses weigh by
            method.observe_labels(run_data.labeled_labels(), list(manifest.label_names))
        steps = skipped = 0
        for stage, stage_dir, checkpointer, start, stage_settings, options in zip(
            stages, stage_dirs, checkpointers, starts, settings, stage_options
        ):
            method.start_stage(stage)
            train_stream = run_data.train_stream(stage, build_view(**view, interpolation=interpolation))
            if stage is not stages[0]:
                accelerator.free_memory()  # the previous stage's wrapped model and optimizer
            optimizer = build_optimizer(
                method.param_groups(options["weight_decay"]), options, accelerator.device
            )
            model, optimizer = accelerator.prepare(method, optimizer)
            trainer = Trainer(
                stage_settings,
                accelerator,
                model,
                optimizer,
                train_stream,
                checkpointer,
                config_yaml,
                validation,
            )
            if main:
                log.info(
                    "run %s: %s%s on %s (%d train memes), %d process(es) x batch %d x %d accumulation = %d per step",
                    run_dir, name, "" if len(stages) == 1 else f" stage {stage.name}", train_stream.split,
                    train_stream.num_samples,
                    accelerator.num_processes, data.batch_size, accumulation, t.global_batch_size,
                )  # fmt: skip
            state = trainer.fit(
                lambda step, d=stage_dir: RunLogger(d, main, step, list(t.log_with), t.tracker_project), start
            )
            steps, skipped = steps + state.step, skipped + state.skipped_steps
            if stage is not stages[-1]:
                trainer.logger.close()

        if cfg.eval.checkpoint == "best":
            best = trainer.load_best()
            if main:
                log.info("evaluating the best checkpoint on dev %s: %s", t.keep_best, best)
        eval_streams = {split: run_data.stream(split, eval_view) for split in data.eval_splits}
        probes = {"linear_probe", "knn"} & set(cfg.eval.protocols)
        probe_stream = (
            run_data.stream(data.train_split, eval_view, subset=run_data.labeled_subset()) if probes else None
        )
        protocols, probe_heads = run_protocols(
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
            threshold=threshold,
            attribute_targets=attributes,
            label_classes=manifest.label_classes,
            zero_shot=zero_shot,
            text_encoder=encoder,
        )
        results = {
            "method": name,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": {
                "shards": data.shards,
                "source": manifest.source,
                "label_fraction": data.label_fraction,
                # how many memes the fraction chose, where labels were used (a supervised stage, a probe)
                "labeled_memes": len(run_data.labeled_subset())
                if probes or any(stage.needs_labels for stage in stages)
                else None,
            },
            "seed": cfg.seed,
            "steps": steps,
            "skipped_steps": skipped,
            "world_size": accelerator.num_processes,
            "checkpoint": _evaluated(trainer, cfg.eval.checkpoint, run_dir),
            "protocols": protocols,
        }
        if main:
            tensors = _evaluated_tensors(trainer)
            _write_model_bundle(
                run_dir, cfg, name, method_options, run_data, results, tensors, probe_heads, interpolation
            )
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


def _evaluated_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the evaluated weights. Under ZeRO-3 each rank holds a shard
    of the parameters: they come from the evaluated checkpoint, merged when it was saved."""
    tensors = method_tensors(trainer.method)
    if trainer.deepspeed and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        tensors |= load_file(str(trainer.checkpoint / WEIGHTS))
    return tensors


def _write_model_bundle(
    run_dir: Path,
    cfg: DictConfig,
    name: str,
    method_options: dict[str, Any],
    run_data: RunData,
    results: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    probe_heads: list | None,
    interpolation: str,
) -> None:
    """``<run>/model/``: the evaluated model with its tokenizer, thresholds and preprocessing."""
    manifest, encoder = run_data.manifest, run_data.encoder
    head, targets, thresholds = choose_head(results["protocols"], manifest.main_label)
    contents = BundleContents(
        method=name,
        method_options=method_options,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        label_names=list(manifest.label_names),
        main_label=manifest.main_label,
        vocab_size=encoder.vocab_size if encoder else None,
        pad_id=encoder.pad_id if encoder else 0,
        image_size=cfg.data.image_size,
        interpolation=interpolation,
        max_length=cfg.data.max_length,
        clean_text=cfg.data.clean_text,
        head=head,
        targets=targets,
        thresholds=thresholds,
        source={
            "run": str(run_dir.resolve()),
            "checkpoint": results["checkpoint"],
            "seed": cfg.seed,
            "shards": str(Path(cfg.data.shards).resolve()),
        },
    )
    probe = probe_tensors(probe_heads) if head == "linear_probe" else None
    write_bundle(run_dir / BUNDLE_DIR, contents, tensors, run_data.tokenizer, probe)


def _claim_run_dir(run_dir: Path, config: dict[str, Any], resume: str, accelerator) -> None:
    """Before anything is written to ``run_dir``: refuse it if it holds a run of another config
    (``memetrain.run_record``), or with ``resume=never`` move the run it holds aside."""
    if resume not in ("auto", "never"):
        _chosen_checkpoint(resume)  # a path that is no checkpoint is refused before anything is written
    if resume == "never":
        if accelerator.is_main_process and holds_a_run(run_dir):
            moved = set_aside(run_dir)
            print(f"resume=never: the earlier run in {run_dir} was moved to {moved}", file=sys.stderr)
    elif (run_dir / CONFIG_FILE).is_file() and holds_results(run_dir):
        recorded = run_dir / CONFIG_FILE
        check_same_config(recorded, read_config(recorded), config, run_ways_out(run_dir))
    accelerator.wait_for_everyone()  # other ranks look at the directory only once it is settled


def _resume_points(
    resume: str, checkpointers: list[Checkpointer], config: dict[str, Any], run_dir: Path
) -> list[Path | None]:
    """The checkpoint each stage continues from (None: the start), each made with this config.

    ``resume=<checkpoint or run directory>`` starts from that checkpoint (a run directory's
    newest), unless this run already has a newer one of its own: a requeued job that began there
    continues where it got to, not from the start again."""
    starts = [None if resume == "never" else checkpointer.latest() for checkpointer in checkpointers]
    if resume not in ("auto", "never"):
        chosen = _chosen_checkpoint(resume)
        if len(checkpointers) > 1:
            raise ConfigError(
                f"resume={resume}: this method trains in {len(checkpointers)} stages, each with its own "
                "checkpoints; copy that run directory and continue it there with resume=auto"
            )
        own = starts[0]
        if own is None or checkpoint_step(own) < checkpoint_step(chosen):
            starts = [chosen]
        else:
            log.info("resume=%s: continuing from this run's own newer checkpoint %s", resume, own)
    for start in starts:
        if start is not None:
            recorded = start / CONFIG_FILE
            check_same_config(recorded, read_config(recorded), config, run_ways_out(run_dir))
    return starts


def _chosen_checkpoint(resume: str) -> Path:
    """``resume=<path>``: a checkpoint directory, or the newest complete checkpoint of a run directory."""
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise ConfigError(f"resume={resume}: that run directory has no complete checkpoint")
        return found[-1]
    if path.is_dir() and (path / CONFIG_FILE).is_file() and path in complete_checkpoints(path.parent):
        return path
    raise ConfigError(
        f"resume={resume!r}: choose auto (continue from the newest checkpoint in the run directory), never "
        "(start over; an earlier run there is moved to previous/), or a checkpoint directory "
        "(<run>/checkpoints/step_NNNNNNN) or run directory to continue from"
    )


def _trainer_settings(options: dict[str, Any], steps: int, evaluated: bool) -> TrainerSettings:
    """The stage's settings from its trainer options: ``keep_best`` and early stopping only for
    the stage that is evaluated (the last; a pretraining stage before it has no classifier to
    score on dev)."""
    fields = {f: options[f] for f in TrainerSettings.__dataclass_fields__}
    if not evaluated:
        return TrainerSettings(**{**fields, "max_steps": steps, "keep_best": None, "early_stopping": {}})
    return TrainerSettings(**{**fields, "max_steps": steps})


def _check_vocabulary(method, encoder, tokenizer: str | None) -> None:
    """A text tower embeds as many token ids as its vocabulary (a pretrained one, its own): a
    tokenizer with more would index past it mid-training."""
    if encoder is None:
        return
    source = tokenizer or "the pack's tokenizer.json"
    for name, module in method.named_modules():
        if (
            isinstance(module, (LSTMTextEncoder, TransformerTextEncoder))
            and encoder.vocab_size > module.vocab_size
        ):
            raise ConfigError(
                f"the tokenizer ({source}) has {encoder.vocab_size} token ids but the text tower {name} embeds "
                f"{module.vocab_size}: give data.tokenizer the tokenizer of model.text.pretrained (its id or directory)"
            )


def _check_evaluation_options(cfg: DictConfig) -> float | None:
    """Refuse evaluation options that cannot work together, before the run directory is claimed;
    returns ``eval.threshold`` as a number, or None (chosen on the dev split)."""
    t, data, evaluation = cfg.trainer, cfg.data, cfg.eval
    if evaluation.online and not data.dev_split:
        raise ConfigError(
            f"eval.online={list(evaluation.online)} monitors on the dev split: set data.dev_split"
        )
    if evaluation.checkpoint not in ("last", "best"):
        raise ConfigError(f"eval.checkpoint={evaluation.checkpoint!r}: choose last or best")
    if evaluation.checkpoint == "best" and not t.keep_best:
        raise ConfigError(
            "eval.checkpoint=best needs trainer.keep_best=<metric>, the dev metric that picks it "
            "(auroc, f1_weighted, task_b_f1_weighted_macro, knn_auroc, or a *loss)"
        )
    if t.keep_best and not data.dev_split:
        raise ConfigError(
            f"trainer.keep_best={t.keep_best} needs a dev split to validate on: set data.dev_split"
        )
    return _fixed_threshold(evaluation.threshold)


def _record_run(
    run_dir: Path, cfg: DictConfig, config_yaml: str, method, processes: int, launch: dict[str, Any]
) -> None:
    """``config.yaml``, ``provenance.json`` (with the weights each tower started from and the image
    preprocessing they expect) and ``.hydra/``: what the run directory is from here on."""
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)
    started_from = {
        "weights": pretrained_weights(method),
        "image_preprocessing": image_preprocessing(method),
        "resize_interpolation": resize_interpolation(cfg.data.interpolation, method),  # what the views use
    }
    atomic_write_json(run_dir / "provenance.json", provenance(processes, cfg.seed) | launch | started_from)
    _record_hydra_config(cfg, run_dir)


def _fixed_threshold(threshold: Any) -> float | None:
    """``eval.threshold``: ``dev`` (chosen on the dev split: None here) or a number in (0, 1)."""
    if threshold == "dev":
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ConfigError(
            f"eval.threshold={threshold!r}: give dev (chosen on the dev split) or a number in (0, 1), e.g. 0.5"
        )
    return float(threshold)


def _check_clipping_under_deepspeed(method) -> None:
    """DeepSpeed clips the gradients' joint norm inside its engine: a method that clips its own
    way (DINO per parameter, dropping its frozen last layer's gradients) would train otherwise."""
    if type(method).clip_gradients is not Method.clip_gradients:
        raise ConfigError(
            f"method {method.name} clips its gradients its own way (per parameter, or dropping a frozen layer's), "
            "which DeepSpeed's engine, clipping their joint norm itself, cannot do: train it with trainer=ddp or single"
        )


def _evaluated(trainer: Trainer, selected: str, run_dir: Path) -> dict[str, Any]:
    """Which weights the results are of: the checkpoint the training ended on (``last``) or the
    best on dev (``best``, with its metric); where training stopped, and whether early."""
    state, checkpoint = trainer.state, trainer.checkpoint
    path = None
    if checkpoint is not None:
        path = str(checkpoint.relative_to(run_dir) if checkpoint.is_relative_to(run_dir) else checkpoint)
    evaluated = {
        "selected": selected,
        "step": checkpoint_step(checkpoint) if checkpoint is not None else state.step,
        "path": path,
        "trained_steps": state.step,
        "stopped_early": state.stopped_early,
    }
    if trainer.s.keep_best:
        evaluated["best"] = {
            "metric": trainer.s.keep_best,
            "value": state.best_value,
            "step": state.best_step,
        }
    return evaluated


def _record_hydra_config(cfg: DictConfig, run_dir: Path) -> None:
    """``.hydra/``: the config, Hydra's own and the overrides, as Hydra would write them
    (``hydra.output_subdir`` is null for training, so that a refused command cannot overwrite the
    record of the run it was refused for; the collector names hand-made runs from it)."""
    if not HydraConfig.initialized():  # called from Python, not from the command line
        return
    hydra = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(out / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra}))
    atomic_write_text(out / "overrides.yaml", OmegaConf.to_yaml(hydra.overrides.task))


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
