"""Evaluation protocols over a trained method: its own classifier, a linear probe, kNN.

Features and logits are computed on every rank, gathered, and scored on rank 0. Each protocol
scores its target labels (the classifier's outputs; ``data.targets`` for the probes): the main
label with binary metrics (MAMI task A), the other targets with multi-label metrics (MAMI task B).
Each label's decision threshold is chosen on the dev split (best accuracy) and reported; a split
without labels gets predictions and no metrics, and says so.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from memetrain.data.stream import MemeStream
from memetrain.errors import ConfigError
from memetrain.eval.metrics import best_threshold, binary_metrics, multilabel_metrics
from memetrain.eval.plots import plot_confusion, plot_roc, plot_tsne
from memetrain.eval.probe import knn_scores, linear_probe
from memetrain.fileio import atomic_writer

log = logging.getLogger(__name__)

PROTOCOLS = ("classifier", "linear_probe", "knn")


@dataclass
class Outputs:
    """What a method produced on one split, in a fixed order (pads dropped)."""

    ids: list[str]
    labels: np.ndarray  # [N, K] all label columns, -1 unlabeled
    features: np.ndarray  # [N, D]
    logits: np.ndarray | None  # [N, targets]


@torch.no_grad()
def collect(method, stream: MemeStream, accelerator: Accelerator, want_logits: bool) -> Outputs:
    """Run ``method`` over one epoch of ``stream`` on every rank and gather the outputs on all."""
    method.eval()
    ids, labels, features, logits = [], [], [], []
    try:
        for batch in stream:
            valid = batch["valid"].numpy()
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.autocast():
                features.append(method.embed(batch).float().cpu().numpy()[valid])
                if want_logits:
                    logits.append(method.predict(batch).float().cpu().numpy()[valid])
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
    scores: dict[str, np.ndarray], outputs: dict[str, Outputs], label_index: int, dev_split: str | None
) -> tuple[float, str]:
    """(threshold, where it came from): best accuracy on ``dev_split`` if it is scored and fully
    labeled for this label column, else 0.5 ("default")."""
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
) -> dict[str, Any]:
    """Binary metrics of class-1 probabilities per split, at a threshold chosen on ``dev_split``."""
    threshold, source = dev_threshold(scores, outputs, label_index, dev_split)
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
            score_splits(main_scores, outputs, label_names.index(main_label), dev_split, label_fraction)
        )
    others = [name for name in targets if name != main_label]
    if others:
        result["multilabel"] = _score_multilabel(
            scores, outputs, targets, others, label_names, dev_split, label_fraction
        )
    return result


def _score_multilabel(scores, outputs, targets, names, label_names, dev_split, label_fraction) -> dict:
    columns = [targets.index(name) for name in names]
    label_index = [label_names.index(name) for name in names]
    thresholds = [
        dev_threshold({s: v[:, c] for s, v in scores.items()}, outputs, i, dev_split)[0]
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
) -> dict[str, Any]:
    """Every protocol on every eval split; returns the ``protocols`` part of ``results.json``.

    The classifier protocol scores the method's own ``targets``; the linear probe (one logistic
    regression per label) and kNN score ``targets`` (``data.targets``).
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"eval.protocols {unknown} unknown; choose from {', '.join(PROTOCOLS)}")
    classify = "classifier" in protocols
    if classify and not method.classifies:
        raise ConfigError(f"method {method.name} does not classify: use eval.protocols=[linear_probe,knn]")
    outputs = {
        split: collect(method, stream, accelerator, classify) for split, stream in eval_streams.items()
    }
    train = collect(method, probe_stream, accelerator, False) if probe_stream is not None else None
    label_index = label_names.index(main_label)
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        for protocol in protocols:
            scored = list(method.targets) if protocol == "classifier" else list(targets)
            columns = [label_names.index(name) for name in scored]
            scores = _protocol_scores(protocol, outputs, train, columns, scored, seed, knn_k)
            results[protocol] = score_targets(
                scores, outputs, scored, label_names, main_label, dev_split, label_fraction
            )
            _write_predictions(
                run_dir / "predictions", protocol, scores, outputs, scored, label_names, dev_split
            )
            if main_label in scored:
                main_scores = {split: values[:, scored.index(main_label)] for split, values in scores.items()}
                _plot(run_dir / "plots", protocol, main_scores, outputs, label_index, results[protocol])
        if tsne:
            split = next(iter(outputs))
            chosen = np.random.default_rng(seed).permutation(len(outputs[split].ids))[:2000]
            plot_tsne(
                outputs[split].features[chosen],
                outputs[split].labels[chosen, label_index],
                run_dir / "plots" / f"tsne_{split}.png",
                seed=seed,
            )
    return results


def _protocol_scores(
    protocol: str,
    outputs: dict[str, Outputs],
    train: Outputs | None,
    columns: list[int],
    names: list[str],
    seed: int,
    knn_k: int,
) -> dict[str, np.ndarray]:
    """Probabilities of class 1 ``[N, len(columns)]`` per split, one column per target label."""
    if protocol == "classifier":
        return {split: 1 / (1 + np.exp(-out.logits)) for split, out in outputs.items()}
    if train is None:
        raise ConfigError(f"eval protocol {protocol} needs the labeled training features (data.train_split)")
    per_target = []
    for column, name in zip(columns, names):
        train_y = train.labels[:, column]
        if protocol == "linear_probe":
            eval_sets = {split: (out.features, None) for split, out in outputs.items()}
            try:
                per_target.append(linear_probe(train.features, train_y, eval_sets, seed=seed).scores)
            except ConfigError as err:
                raise ConfigError(f"label {name!r}: {err}") from None
            continue
        labeled = train_y >= 0
        per_target.append(
            {
                split: knn_scores(train.features[labeled], train_y[labeled], out.features, k=knn_k)
                for split, out in outputs.items()
            }
        )
    return {split: np.stack([scores[split] for scores in per_target], axis=1) for split in outputs}


def _write_predictions(
    directory: Path,
    protocol: str,
    scores: dict[str, np.ndarray],
    outputs: dict[str, Outputs],
    targets: list[str],
    label_names: list[str],
    dev_split: str | None,
) -> None:
    """``<protocol>_<split>.csv``: ``id`` then, per target, score, prediction (at the target's dev
    threshold) and label; the main label's columns are ``score,prediction,label`` when it is the
    only target, and ``<label>_score,<label>_prediction,<label>`` otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    index = [label_names.index(name) for name in targets]
    thresholds = [
        dev_threshold({s: v[:, k] for s, v in scores.items()}, outputs, i, dev_split)[0]
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
