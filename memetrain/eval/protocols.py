"""Evaluation protocols over a trained method: its own classifier, a linear probe, kNN, zero-shot.

Features and logits are computed on every rank, gathered, and scored on rank 0. Each protocol
scores its target labels (the classifier's outputs; ``data.targets`` for the probes and zero-shot):
the main label with binary metrics (MAMI task A), the other targets with multi-label metrics (MAMI
task B). Each label's decision threshold is chosen on the dev split (best accuracy) and reported; a
split without labels gets predictions and no metrics, and says so.

The probes and zero-shot also score ``eval.targets`` (attribute probes: any packed label column,
such as SynthMemes' ``image_class``), each on its own under ``attributes.<label>``: a 0/1 column
with binary metrics, a column of class ids with :func:`memetrain.eval.metrics.multiclass_metrics`
(accuracy, macro F1 ...) of a multinomial probe or kNN's class votes.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from memetrain.data.stream import MemeStream
from memetrain.engine.distributed import training_autocast
from memetrain.errors import ConfigError
from memetrain.eval import zero_shot as zs
from memetrain.eval.metrics import best_threshold, binary_metrics, multiclass_metrics, multilabel_metrics
from memetrain.eval.plots import plot_confusion, plot_roc, plot_tsne
from memetrain.eval.probe import LinearHead, knn_class_scores, knn_scores, linear_probe, linear_probe_classes
from memetrain.fileio import atomic_writer

log = logging.getLogger(__name__)

PROTOCOLS = ("classifier", "linear_probe", "knn", "zero_shot")
ATTRIBUTE_PROTOCOLS = ("linear_probe", "knn", "zero_shot")
"""The protocols that also score ``eval.targets``."""


@dataclass
class Outputs:
    """What a method produced on one split, in a fixed order (pads dropped)."""

    ids: list[str]
    labels: np.ndarray  # [N, K] all label columns, -1 unlabeled
    features: np.ndarray  # [N, D]
    logits: np.ndarray | None  # [N, targets]


@torch.no_grad()
def collect(
    method,
    stream: MemeStream,
    accelerator: Accelerator,
    want_logits: bool,
    embed: Callable | None = None,
    what: str | None = None,
) -> Outputs:
    """Run ``method`` over one epoch of ``stream`` on every rank and gather the outputs on all.
    ``embed``: what gives the features of a batch (default ``method.embed``). ``what``: a name for
    a progress bar and a log line on rank 0 (None: quiet, as the validation during training)."""
    method.eval()
    ids, labels, features, logits = [], [], [], []
    main = accelerator.is_main_process
    if what is not None and main:
        log.info("%s: %d memes of %s", what, stream.num_samples, stream.split)
    batches = tqdm(
        stream,
        desc=what,
        unit="batch",
        total=len(stream),
        disable=what is None or not main,
        dynamic_ncols=True,
    )
    try:
        for batch in batches:
            valid = batch["valid"].numpy()
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with training_autocast(accelerator):  # the training precision, also under DeepSpeed
                if want_logits:  # the encoders run once for both
                    embedded, predicted = method.embed_and_predict(batch)
                    logits.append(predicted.float().cpu().numpy()[valid])
                else:
                    embedded = (embed or method.embed)(batch)
                features.append(embedded.float().cpu().numpy()[valid])
            ids += [key for key, keep in zip(batch["id"], valid) if keep]
            labels.append(batch["labels"].cpu().numpy()[valid])
    finally:
        method.train()
    local = (
        ids,
        np.concatenate(labels),
        np.concatenate(features),
        np.concatenate(logits) if want_logits else None,
    )
    parts = [local]
    if accelerator.num_processes > 1:
        parts = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(parts, local)
    order = np.argsort(np.concatenate([part[0] for part in parts]), kind="stable")  # by id: rank-independent
    merged = [
        np.concatenate([part[i] for part in parts]) if parts[0][i] is not None else None for i in (1, 2, 3)
    ]
    all_ids = [key for part in parts for key in part[0]]
    return Outputs(
        ids=[all_ids[i] for i in order],
        labels=merged[0][order],
        features=merged[1][order],
        logits=None if merged[2] is None else merged[2][order],
    )


def dev_threshold(
    scores: dict[str, np.ndarray],
    outputs: dict[str, Outputs],
    label_index: int,
    dev_split: str | None,
    fixed: float | None = None,
) -> tuple[float, str]:
    """(threshold, where it came from): ``fixed`` if given (``eval.threshold``, as a paper scores at
    0.5), else best accuracy on ``dev_split`` if it is scored and fully labeled for this label
    column, else 0.5 ("default")."""
    if fixed is not None:
        return float(fixed), "fixed"
    labels = outputs[dev_split].labels[:, label_index] if dev_split in scores else None
    if labels is not None and (labels >= 0).all():
        return best_threshold(labels, scores[dev_split], "accuracy"), dev_split
    return 0.5, "default"


def score_splits(
    scores: dict[str, np.ndarray],
    outputs: dict[str, Outputs],
    label_index: int,
    dev_split: str | None,
    label_fraction: float,
    fixed: float | None = None,
) -> dict[str, Any]:
    """Binary metrics of class-1 probabilities per split, at a threshold chosen on ``dev_split``
    (or ``fixed``)."""
    threshold, source = dev_threshold(scores, outputs, label_index, dev_split, fixed)
    splits = {}
    for split, split_scores in scores.items():
        labels = outputs[split].labels[:, label_index]
        if (labels < 0).any():
            splits[split] = _unlabeled_note(labels)
            continue
        splits[split] = {**binary_metrics(labels, split_scores, threshold), "label_fraction": label_fraction}
    return {"threshold": threshold, "threshold_source": source, "splits": splits}


def score_targets(
    scores: dict[str, np.ndarray],
    outputs: dict[str, Outputs],
    targets: list[str],
    label_names: list[str],
    main_label: str,
    dev_split: str | None,
    label_fraction: float,
    fixed: float | None = None,
) -> dict[str, Any]:
    """One protocol's part of ``results.json`` from its scores ``[N, len(targets)]`` per split.

    ``splits``: the main label's binary metrics per split (MAMI task A; empty when the main label
    is not a target), with ``threshold`` and ``threshold_source``. ``multilabel``: when there are
    other targets (MAMI task B: the four types), per split :func:`multilabel_metrics` over them,
    each label at its own threshold chosen on ``dev_split``.
    """
    result: dict[str, Any] = {"targets": list(targets), "splits": {}}
    if main_label in targets:
        column = targets.index(main_label)
        main_scores = {split: values[:, column] for split, values in scores.items()}
        result.update(
            score_splits(
                main_scores, outputs, label_names.index(main_label), dev_split, label_fraction, fixed
            )
        )
    others = [name for name in targets if name != main_label]
    if others:
        result["multilabel"] = _score_multilabel(
            scores, outputs, targets, others, label_names, dev_split, label_fraction, fixed
        )
    return result


def _score_multilabel(scores, outputs, targets, names, label_names, dev_split, label_fraction, fixed) -> dict:
    columns = [targets.index(name) for name in names]
    label_index = [label_names.index(name) for name in names]
    thresholds = [
        dev_threshold({s: v[:, c] for s, v in scores.items()}, outputs, i, dev_split, fixed)[0]
        for c, i in zip(columns, label_index)
    ]
    result = {}
    for split, values in scores.items():
        labels = outputs[split].labels[:, label_index]
        if (labels < 0).any():
            result[split] = _unlabeled_note(labels)
            continue
        metrics = multilabel_metrics(labels, values[:, columns], names, thresholds)
        result[split] = {**metrics, "label_fraction": label_fraction}
    return result


def _unlabeled_note(labels: np.ndarray) -> dict[str, Any]:
    return {
        "num_samples": len(labels),
        "unlabeled": int((labels < 0).any(axis=1).sum() if labels.ndim == 2 else (labels < 0).sum()),
        "note": "split has unlabeled memes: predictions written, no metrics",
    }


def check_attribute_targets(attribute_targets: Sequence[str], label_names: Sequence[str]) -> list[str]:
    """``eval.targets``, refused unless each is a label column of the pack, once."""
    not_labels = [name for name in attribute_targets if name not in label_names]
    if not_labels or len(set(attribute_targets)) != len(attribute_targets):
        raise ConfigError(
            f"eval.targets={list(attribute_targets)}: each must be a label column of the pack, once "
            f"(it has {', '.join(label_names)})"
        )
    return list(attribute_targets)


def run_protocols(
    method,
    protocols: list[str],
    eval_streams: dict[str, MemeStream],
    probe_stream: MemeStream | None,
    accelerator: Accelerator,
    run_dir: Path,
    dev_split: str | None,
    label_fraction: float,
    main_label: str,
    label_names: list[str],
    targets: list[str],
    seed: int,
    knn_k: int,
    tsne: bool,
    threshold: float | None = None,
    attribute_targets: Sequence[str] = (),
    label_classes: Mapping[str, Sequence[str]] | None = None,
    zero_shot: zs.ZeroShotSettings | None = None,
    text_encoder=None,
) -> tuple[dict[str, Any], list[LinearHead] | None]:
    """Every protocol on every eval split; returns the ``protocols`` part of ``results.json`` and
    the linear probe's fitted heads (one per target; None without that protocol), for the bundle.

    The classifier protocol scores the method's own ``targets``; the linear probe (one logistic
    regression per label), kNN and zero-shot score ``targets`` (``data.targets``). Decisions are taken
    at each label's threshold chosen on ``dev_split``, or at ``threshold`` for every label when given.
    The probes and zero-shot also score each of ``attribute_targets`` (``eval.targets``) under
    ``attributes``; ``label_classes`` names the classes of the columns that hold class ids.
    ``zero_shot``: the prompts and embedding of the zero-shot protocol, whose prompts are tokenised
    by ``text_encoder`` (the run's; None: the method tokenises raw text itself).
    """
    label_classes = dict(label_classes or {})
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"eval.protocols {unknown} unknown; choose from {', '.join(PROTOCOLS)}")
    classify = "classifier" in protocols
    if classify and not method.classifies:
        raise ConfigError(f"method {method.name} does not classify: use eval.protocols=[linear_probe,knn]")
    check_attribute_targets(attribute_targets, label_names)
    class_targets = [name for name in targets if name in label_classes]
    if class_targets:
        raise ConfigError(
            f"data.targets {class_targets} hold class ids, not 0/1 labels: classifiers predict 0/1 labels; "
            f"probe them with eval.targets={class_targets}"
        )
    if not protocols and not tsne:  # nothing reads a feature
        return {}, None
    outputs = {
        split: collect(method, stream, accelerator, classify, what=f"evaluating {split}")
        for split, stream in eval_streams.items()
    }
    train = (
        collect(method, probe_stream, accelerator, False, what="features of the labeled training memes")
        if probe_stream is not None
        else None
    )
    zero_shot_outputs, prompt_classes = {}, {}
    if "zero_shot" in protocols:
        if zero_shot is None:
            raise ConfigError("eval protocol zero_shot needs eval.zero_shot (its prompts and embed)")
        zs.check_method(method)
        prompted = [t for t in attribute_targets if t in zero_shot.prompts and t not in targets]
        for name in [*targets, *prompted]:  # on every rank: the text tower may be sharded (ZeRO-3)
            prompts = zero_shot.class_prompts(name, label_classes.get(name))
            prompt_classes[name] = zs.class_embeddings(method, prompts, text_encoder, accelerator.device)
        embed = lambda batch: method.zero_shot_embed(batch, zero_shot.embed)  # noqa: E731
        zero_shot_outputs = {
            split: collect(method, stream, accelerator, False, embed, what=f"zero-shot embeddings of {split}")
            for split, stream in eval_streams.items()
        }
    label_index = label_names.index(main_label)
    results: dict[str, Any] = {}
    heads = None
    if accelerator.is_main_process:
        for protocol in protocols:
            scored = list(method.targets) if protocol == "classifier" else list(targets)
            columns = [label_names.index(name) for name in scored]
            if protocol == "zero_shot":
                scores = {
                    split: np.stack(
                        [zs.probabilities(out.features, prompt_classes[name])[:, 1] for name in scored],
                        axis=1,
                    )
                    for split, out in zero_shot_outputs.items()
                }
                fitted = None
            else:
                if protocol != "classifier":
                    log.info(
                        "%s of %s on %d training memes",
                        protocol,
                        ", ".join(scored),
                        len(train.ids) if train else 0,
                    )
                scores, fitted = _protocol_scores(protocol, outputs, train, columns, scored, seed, knn_k)
            heads = fitted or heads
            results[protocol] = score_targets(
                scores, outputs, scored, label_names, main_label, dev_split, label_fraction, threshold
            )
            _write_predictions(
                run_dir / "predictions", protocol, scores, outputs, scored, label_names, dev_split, threshold
            )
            if main_label in scored:
                main_scores = {split: values[:, scored.index(main_label)] for split, values in scores.items()}
                _plot(run_dir / "plots", protocol, main_scores, outputs, label_index, results[protocol])
            if attribute_targets and protocol in ATTRIBUTE_PROTOCOLS:
                features = zero_shot_outputs if protocol == "zero_shot" else outputs
                results[protocol]["attributes"] = {
                    name: {"note": f"no eval.zero_shot.prompts.{name}: not scored zero-shot"}
                    if protocol == "zero_shot" and name not in prompt_classes
                    else _score_attribute(
                        protocol, name, features, train, label_names, label_classes.get(name),
                        dev_split, label_fraction, threshold, seed, knn_k, prompt_classes.get(name),
                        run_dir / "predictions",
                    )
                    for name in attribute_targets
                }  # fmt: skip
        if tsne:
            split = next(iter(outputs))
            chosen = np.random.default_rng(seed).permutation(len(outputs[split].ids))[:2000]
            log.info("t-SNE of %d memes of %s", len(chosen), split)
            plot_tsne(
                outputs[split].features[chosen],
                outputs[split].labels[chosen, label_index],
                run_dir / "plots" / f"tsne_{split}.png",
                seed=seed,
            )
    return results, heads


def _score_attribute(
    protocol: str,
    name: str,
    outputs: dict[str, Outputs],
    train: Outputs | None,
    label_names: list[str],
    classes: Sequence[str] | None,
    dev_split: str | None,
    label_fraction: float,
    threshold: float | None,
    seed: int,
    knn_k: int,
    prompt_classes: torch.Tensor | None,
    directory: Path,
) -> dict[str, Any]:
    """One attribute column's scores under ``protocol``: binary metrics at a dev threshold for a 0/1
    column (``kind: binary``), multi-class metrics of the most probable class for a class-id column
    (``kind: classes``); its predictions go to ``<protocol>_<label>_<split>.csv``."""
    column = label_names.index(name)
    if classes is None:
        if protocol == "zero_shot":
            scores = {s: zs.probabilities(o.features, prompt_classes)[:, 1] for s, o in outputs.items()}
        else:
            stacked, _ = _protocol_scores(protocol, outputs, train, [column], [name], seed, knn_k)
            scores = {split: values[:, 0] for split, values in stacked.items()}
        result = {
            "kind": "binary",
            **score_splits(scores, outputs, column, dev_split, label_fraction, threshold),
        }
        cut = result["threshold"]
        _write_attribute(directory, protocol, name, outputs, column, {s: v[:, None] for s, v in scores.items()},
                         {s: (v >= cut).astype(int) for s, v in scores.items()}, ["score"])  # fmt: skip
        return result
    probabilities = _class_probabilities(
        protocol, name, outputs, train, column, len(classes), seed, knn_k, prompt_classes
    )
    splits = {}
    for split, values in probabilities.items():
        labels = outputs[split].labels[:, column]
        if (labels < 0).any():
            splits[split] = _unlabeled_note(labels)
            continue
        splits[split] = {**multiclass_metrics(labels, values, classes), "label_fraction": label_fraction}
    predicted = {split: values.argmax(axis=1) for split, values in probabilities.items()}
    _write_attribute(
        directory, protocol, name, outputs, column, probabilities, predicted, [f"p_{c}" for c in classes]
    )
    return {"kind": "classes", "classes": list(classes), "splits": splits}


def _class_probabilities(
    protocol, name, outputs, train, column, num_classes, seed, knn_k, prompt_classes
) -> dict[str, np.ndarray]:
    """``[N, num_classes]`` class probabilities per split of a class-id column."""
    if protocol == "zero_shot":
        return {split: zs.probabilities(out.features, prompt_classes) for split, out in outputs.items()}
    if train is None:
        raise ConfigError(f"eval protocol {protocol} needs the labeled training features (data.train_split)")
    train_y = train.labels[:, column]
    if protocol == "linear_probe":
        try:
            return linear_probe_classes(
                train.features, train_y, {s: o.features for s, o in outputs.items()}, num_classes, seed
            )
        except ConfigError as err:
            raise ConfigError(f"label {name!r}: {err}") from None
    labeled = train_y >= 0
    return {
        split: knn_class_scores(train.features[labeled], train_y[labeled], out.features, num_classes, k=knn_k)
        for split, out in outputs.items()
    }


def _write_attribute(directory, protocol, name, outputs, column, scores, predicted, score_names) -> None:
    """``<protocol>_<label>_<split>.csv``: id, prediction, label and the scores (class probabilities)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, values in scores.items():
        with atomic_writer(directory / f"{protocol}_{name}_{split}.csv", "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "prediction", "label", *score_names])
            labels = outputs[split].labels[:, column]
            for key, prediction, label, row in zip(outputs[split].ids, predicted[split], labels, values):
                writer.writerow([key, int(prediction), int(label), *(f"{v:.6f}" for v in row)])


def _protocol_scores(
    protocol: str,
    outputs: dict[str, Outputs],
    train: Outputs | None,
    columns: list[int],
    names: list[str],
    seed: int,
    knn_k: int,
) -> tuple[dict[str, np.ndarray], list[LinearHead] | None]:
    """Probabilities of class 1 ``[N, len(columns)]`` per split, one column per target label, and
    the linear probe's heads (None for the other protocols)."""
    if protocol == "classifier":
        return {split: 1 / (1 + np.exp(-out.logits)) for split, out in outputs.items()}, None
    if train is None:
        raise ConfigError(f"eval protocol {protocol} needs the labeled training features (data.train_split)")
    per_target, heads = [], []
    for column, name in zip(columns, names):
        train_y = train.labels[:, column]
        if protocol == "linear_probe":
            eval_sets = {split: (out.features, None) for split, out in outputs.items()}
            try:
                probe = linear_probe(train.features, train_y, eval_sets, seed=seed)
            except ConfigError as err:
                raise ConfigError(f"label {name!r}: {err}") from None
            per_target.append(probe.scores)
            heads.append(probe.head)
            continue
        labeled = train_y >= 0
        per_target.append(
            {
                split: knn_scores(train.features[labeled], train_y[labeled], out.features, k=knn_k)
                for split, out in outputs.items()
            }
        )
    stacked = {split: np.stack([scores[split] for scores in per_target], axis=1) for split in outputs}
    return stacked, heads or None


def _write_predictions(
    directory: Path,
    protocol: str,
    scores: dict[str, np.ndarray],
    outputs: dict[str, Outputs],
    targets: list[str],
    label_names: list[str],
    dev_split: str | None,
    fixed: float | None = None,
) -> None:
    """``<protocol>_<split>.csv``: ``id`` then, per target, score, prediction (at the target's dev
    threshold) and label; the main label's columns are ``score,prediction,label`` when it is the
    only target, and ``<label>_score,<label>_prediction,<label>`` otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    index = [label_names.index(name) for name in targets]
    thresholds = [
        dev_threshold({s: v[:, k] for s, v in scores.items()}, outputs, i, dev_split, fixed)[0]
        for k, i in enumerate(index)
    ]
    single = len(targets) == 1
    header = ["id"]
    for name in targets:
        header += (
            ["score", "prediction", "label"] if single else [f"{name}_score", f"{name}_prediction", name]
        )
    for split, split_scores in scores.items():
        labels = outputs[split].labels[:, index]
        with atomic_writer(directory / f"{protocol}_{split}.csv", "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for key, row_scores, row_labels in zip(outputs[split].ids, split_scores, labels):
                row = [key]
                for score, label, threshold in zip(row_scores, row_labels, thresholds):
                    row += [f"{score:.6f}", int(score >= threshold), int(label)]
                writer.writerow(row)


def _plot(directory: Path, protocol: str, scores, outputs, label_index: int, result: dict) -> None:
    for split, metrics in result["splits"].items():
        if "confusion_matrix" not in metrics:
            continue
        plot_roc(
            outputs[split].labels[:, label_index], scores[split], directory / f"{protocol}_roc_{split}.png"
        )
        plot_confusion(metrics["confusion_matrix"], directory / f"{protocol}_confusion_{split}.png")
