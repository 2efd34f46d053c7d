"""Evaluation protocols over a trained method: its own classifier, a linear probe, kNN.

Features and logits are computed on every rank, gathered, and scored on rank 0. The decision
threshold is chosen on the dev split (best accuracy) and reported; a split without labels gets
predictions and no metrics, and says so.
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


def score_splits(
    scores: dict[str, np.ndarray],
    outputs: dict[str, Outputs],
    label_index: int,
    dev_split: str | None,
    label_fraction: float,
) -> dict[str, Any]:
    """Binary metrics of class-1 probabilities per split, at a threshold chosen on ``dev_split``."""
    threshold, source = 0.5, "default"
    if dev_split in scores and (outputs[dev_split].labels[:, label_index] >= 0).all():
        threshold = best_threshold(outputs[dev_split].labels[:, label_index], scores[dev_split], "accuracy")
        source = dev_split
    splits = {}
    for split, split_scores in scores.items():
        labels = outputs[split].labels[:, label_index]
        if (labels < 0).any():
            splits[split] = {
                "num_samples": len(labels),
                "unlabeled": int((labels < 0).sum()),
                "note": "split has unlabeled memes: predictions written, no metrics",
            }
            continue
        splits[split] = {**binary_metrics(labels, split_scores, threshold), "label_fraction": label_fraction}
    return {"threshold": threshold, "threshold_source": source, "splits": splits}


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
    seed: int,
    knn_k: int,
    tsne: bool,
) -> dict[str, Any]:
    """Every protocol on every eval split; returns the ``protocols`` part of ``results.json``."""
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
            scores = _protocol_scores(protocol, outputs, train, label_index, seed, knn_k)
            results[protocol] = score_splits(scores, outputs, label_index, dev_split, label_fraction)
            if protocol == "classifier" and next(iter(outputs.values())).logits.shape[1] > 1:
                results[protocol]["multilabel"] = _multilabel(method, outputs, label_names)
            threshold = results[protocol]["threshold"]
            _write_predictions(run_dir / "predictions", protocol, scores, outputs, threshold, label_index)
            _plot(run_dir / "plots", protocol, scores, outputs, label_index, results[protocol])
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
    protocol: str, outputs: dict[str, Outputs], train: Outputs | None, label_index: int, seed: int, knn_k: int
) -> dict[str, np.ndarray]:
    if protocol == "classifier":
        return {split: 1 / (1 + np.exp(-out.logits[:, 0])) for split, out in outputs.items()}
    if train is None:
        raise ConfigError(f"eval protocol {protocol} needs the labeled training features (data.train_split)")
    train_y = train.labels[:, label_index]
    if protocol == "linear_probe":
        eval_sets = {split: (out.features, None) for split, out in outputs.items()}
        return linear_probe(train.features, train_y, eval_sets, seed=seed).scores
    labeled = train_y >= 0
    return {
        split: knn_scores(train.features[labeled], train_y[labeled], out.features, k=knn_k)
        for split, out in outputs.items()
    }


def _multilabel(method, outputs: dict[str, Outputs], label_names: list[str]) -> dict[str, Any]:
    targets = method.targets
    index = [label_names.index(name) for name in targets]
    result = {}
    for split, out in outputs.items():
        labels = out.labels[:, index]
        if (labels >= 0).all():
            result[split] = multilabel_metrics(labels, 1 / (1 + np.exp(-out.logits)), targets)
    return result


def _write_predictions(
    directory: Path, protocol: str, scores, outputs, threshold: float, label_index: int
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_scores in scores.items():
        with atomic_writer(directory / f"{protocol}_{split}.csv", "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "score", "prediction", "label"])
            for key, score, label in zip(
                outputs[split].ids, split_scores, outputs[split].labels[:, label_index]
            ):
                writer.writerow([key, f"{score:.6f}", int(score >= threshold), int(label)])


def _plot(directory: Path, protocol: str, scores, outputs, label_index: int, result: dict) -> None:
    for split, metrics in result["splits"].items():
        if "confusion_matrix" not in metrics:
            continue
        plot_roc(
            outputs[split].labels[:, label_index], scores[split], directory / f"{protocol}_roc_{split}.png"
        )
        plot_confusion(metrics["confusion_matrix"], directory / f"{protocol}_confusion_{split}.png")
