"""Validation during training, on the dev split: what ``trainer.keep_best`` and early stopping watch.

Every method reports the means of its validation terms over the split (by default its training
losses and reports: ``loss``, ``accuracy`` ...). A method that classifies also reports the studies'
metrics of its scores over the whole split, gathered from every rank: for the data's main label
``auroc`` (Hateful Memes' metric), ``f1_weighted`` and ``f1_macro`` (MAMI task A's); for its other
targets (MAMI task B) ``task_b_f1_weighted_macro`` (the official task B score) and ``task_b_auroc``.
F1s are at the neutral threshold 0.5: thresholds are chosen on dev after training, and a threshold
tuned on the split that also picks the checkpoint would flatter it. Every rank computes the same
values from the same gathered scores, so every rank takes the same keep-best and stopping decisions.

Online monitors (``eval.online``), as solo-learn watches a pretraining, score the method's frozen
features of the dev split against a bank of labeled training memes (``eval.online_bank`` of the
label fraction) for the main label: ``knn`` (the kNN protocol: ``knn_auroc``, ``knn_accuracy``) and
``linear_probe`` (a logistic regression fitted on the bank's features: ``linear_probe_auroc`` ...),
so a pretraining that does not learn shows while it runs, and ``trainer.keep_best=knn_auroc`` can
keep a pretraining's best checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from memetrain.data.stream import MemeStream
from memetrain.engine.distributed import training_autocast
from memetrain.engine.optim import LOWER_IS_BETTER_SUFFIX
from memetrain.eval.metrics import binary_metrics, multilabel_metrics
from memetrain.eval.probe import knn_scores, linear_probe
from memetrain.eval.protocols import collect

MONITORS = ("knn", "linear_probe")


def improves(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` by more than ``min_delta``."""
    if best is None:
        return True
    if metric.endswith(LOWER_IS_BETTER_SUFFIX):
        return value < best - min_delta
    return value > best + min_delta


class Validation:
    """The dev split's metrics for a method: ``validation(method, accelerator)`` on every rank."""

    def __init__(
        self,
        stream: MemeStream,
        label_names: list[str],
        main_label: str,
        monitors: list[str] = (),
        bank: MemeStream | None = None,
        knn_k: int = 20,
        seed: int = 0,
    ):
        unknown = [name for name in monitors if name not in MONITORS]
        if unknown or (monitors and bank is None):
            raise ValueError(
                f"online monitors {list(monitors)}: choose from {MONITORS}, with a bank to score against"
            )
        self.stream, self.label_names, self.main_label = stream, list(label_names), main_label
        self.monitors, self.bank, self.knn_k, self.seed = list(monitors), bank, knn_k, seed

    @torch.no_grad()
    def __call__(self, method, accelerator: Accelerator) -> dict[str, float]:
        from memetrain.engine.trainer import to_device  # the engine imports this module's users

        classifies = method.classifies
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=accelerator.device)
        scores, labels = [], []
        method.eval()
        try:
            for batch in self.stream:
                valid = batch["valid"].numpy()
                batch = to_device(batch, accelerator.device)
                weight = batch["valid"].sum()
                with training_autocast(accelerator):  # the training precision, also under DeepSpeed
                    metrics = method.validation_step(batch)
                    logits = method.predict(batch) if classifies else None
                losses = [value for name, value in metrics.items() if name.endswith("_loss")]
                if losses:
                    metrics["loss"] = sum(losses)
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0) + value.detach().float() * weight
                count += weight
                if classifies:
                    scores.append(torch.sigmoid(logits.float()).cpu().numpy()[valid])
                    labels.append(batch["labels"].cpu().numpy()[valid])
        finally:
            method.train()
        count = accelerator.reduce(count, "sum")
        result = {name: (accelerator.reduce(total, "sum") / count).item() for name, total in sums.items()}
        if classifies:
            result |= self._study_metrics(list(method.targets), *_gathered(scores, labels, accelerator))
        if self.monitors:
            result |= self._monitored(method, accelerator)
        return result

    def _monitored(self, method, accelerator: Accelerator) -> dict[str, float]:
        """The online monitors' main-label metrics of the dev split's frozen features."""
        column = self.label_names.index(self.main_label)
        bank, dev = (
            collect(method, self.bank, accelerator, False),
            collect(method, self.stream, accelerator, False),
        )
        bank_labels, dev_labels = bank.labels[:, column], dev.labels[:, column]
        scored = dev_labels >= 0
        found: dict[str, float] = {}
        for monitor in self.monitors:
            if monitor == "knn":
                scores = knn_scores(bank.features, bank_labels, dev.features, k=self.knn_k)
            else:
                scores = linear_probe(
                    bank.features, bank_labels, {"dev": (dev.features, None)}, seed=self.seed
                ).scores["dev"]
            metrics = binary_metrics(dev_labels[scored], scores[scored])
            found |= {
                f"{monitor}_{name}": metrics[name]
                for name in ("auroc", "accuracy")
                if metrics[name] is not None
            }
        return found

    def _study_metrics(self, targets: list[str], scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The main label's AUROC and F1s, and the other targets' task B score; labels that a
        meme lacks (-1) leave it out of that label's metrics."""
        found: dict[str, float] = {}
        if self.main_label in targets:
            y = labels[:, self.label_names.index(self.main_label)]
            s = scores[:, targets.index(self.main_label)]
            if (y >= 0).any():
                metrics = binary_metrics(y[y >= 0], s[y >= 0])
                found |= {name: metrics[name] for name in ("auroc", "f1_weighted", "f1_macro")}
        others = [name for name in targets if name != self.main_label]
        if others:
            y = labels[:, [self.label_names.index(name) for name in others]]
            labeled = (y >= 0).all(axis=1)
            if labeled.any():
                s = scores[:, [targets.index(name) for name in others]]
                metrics = multilabel_metrics(y[labeled], s[labeled], others)
                found |= {
                    "task_b_f1_weighted_macro": metrics["f1_weighted_macro"],
                    "task_b_auroc": metrics["auroc"],
                }
        return {name: value for name, value in found.items() if value is not None}  # AUROC of one class


def _gathered(scores: list, labels: list, accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray]:
    """This rank's scores and labels concatenated with every other rank's (rank order)."""
    local = (np.concatenate(scores), np.concatenate(labels))
    if accelerator.num_processes == 1:
        return local
    parts = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(parts, local)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
