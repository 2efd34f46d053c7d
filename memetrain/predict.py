"""Score new memes with a model bundle: ``launcher/predict.py`` (see its docstring for commands).

Memes come from a source, read as packing reads them (a folder with a CSV/TSV/JSONL file, a
Hateful Memes or MAMI directory: every bad meme is refused with its id and reason), or from packed
shards (streamed as evaluation streams them). Each process scores every ``world``-th meme; rank 0
gathers them and writes one CSV row per meme, in input order: its id, then per target label the
probability, the decision at the bundle's threshold and, where the input has it, the label. Memes
that cannot be scored go to ``<output>.rejected.csv`` with their reason, never dropped silently.
With labels present, the metrics are printed (and returned).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memetrain.bundle import MemeModel
from memetrain.data.decode import BadSample
from memetrain.data.records import Rejected
from memetrain.eval.metrics import binary_metrics, multilabel_metrics
from memetrain.fileio import atomic_writer

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One process's (then, gathered, every process's) scores, in input order."""

    order: list[Any] = field(
        default_factory=list
    )  # each meme's place: its position in a source, its id in shards
    ids: list[str] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)  # per meme [T]
    labels: list[np.ndarray] = field(default_factory=list)  # per meme [T], -1 where the input has none
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (position, id, reason)

    def merge(self, parts: list[Scored]) -> Scored:
        merged = Scored()
        for part in parts:
            for name in ("order", "ids", "probabilities", "labels", "rejected"):
                getattr(merged, name).extend(getattr(part, name))
        ranked = np.argsort(merged.order, kind="stable")
        merged.order = [merged.order[i] for i in ranked]
        merged.ids = [merged.ids[i] for i in ranked]
        merged.probabilities = [merged.probabilities[i] for i in ranked]
        merged.labels = [merged.labels[i] for i in ranked]
        merged.rejected.sort()
        return merged


def score_source(
    model: MemeModel, source, splits: list[str] | None, batch_size: int, rank: int, world: int
) -> Scored:
    """Score this rank's share of ``source``'s memes (those of ``splits``; every one when None)."""
    entries = [
        entry
        for entry in source.entries()
        if isinstance(entry, Rejected) or not splits or entry.split in splits
    ]
    names = list(getattr(source, "label_names", ()))
    scored, pending = Scored(), []
    mine = range(rank, len(entries), world)
    for position in tqdm(mine, desc="predict", unit="meme", disable=rank != 0, dynamic_ncols=True):
        entry = entries[position]
        try:
            if isinstance(entry, Rejected):
                raise entry
            record = source.load(entry)
            pixels = model.pixels(record.id, record.image)
        except Rejected as bad:
            scored.rejected.append((position, bad.id, bad.reason))
            continue
        except BadSample as bad:
            scored.rejected.append((position, bad.key, bad.reason))
            continue
        labels = [record.labels.get(name, -1) if name in names else -1 for name in model.targets]
        pending.append((position, record.id, pixels, record.text, labels))
        if len(pending) == batch_size:
            _score(model, pending, scored)
            pending = []
    if pending:
        _score(model, pending, scored)
    return scored


def score_shards(model: MemeModel, shards: Path, split: str, batch_size: int, num_workers: int) -> Scored:
    """Score a packed split, streamed as evaluation streams it (every meme once, split by rank)."""
    from memetrain.data.manifest import Manifest
    from memetrain.data.stream import MemeStream, StreamSettings

    manifest = Manifest.load(shards)
    columns = [manifest.label_names.index(t) if t in manifest.label_names else None for t in model.targets]
    settings = StreamSettings(batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stream = MemeStream(shards, split, settings, model.view, model.text_encoder)
    scored = Scored()
    for batch in tqdm(stream, desc="predict", unit="batch", dynamic_ncols=True):
        valid = batch["valid"].numpy()
        probabilities = model.predict_batch(batch).numpy()
        labels = batch["labels"].numpy()
        for row in np.flatnonzero(valid):
            scored.order.append(batch["id"][row])  # split ids are unique: they order the gathered rows
            scored.ids.append(batch["id"][row])
            scored.probabilities.append(probabilities[row])
            scored.labels.append(np.array([labels[row, c] if c is not None else -1 for c in columns]))
    if stream.bad_samples:
        log.warning(
            "%d bad samples in %s/%s were not scored (named in the warnings above)",
            stream.bad_samples,
            shards,
            split,
        )
    return scored


def write_predictions(path: Path, model: MemeModel, scored: Scored) -> Path | None:
    """The predictions CSV, and ``<stem>.rejected.csv`` when memes could not be scored (its path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labeled = [k for k in range(len(model.targets)) if any(row[k] >= 0 for row in scored.labels)]
    header = ["id"]
    for k, name in enumerate(model.targets):
        header += [f"{name}_probability", f"{name}_decision"] + ([name] if k in labeled else [])
    thresholds = model.thresholds
    with atomic_writer(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for key, probabilities, labels in zip(scored.ids, scored.probabilities, scored.labels):
            row = [key]
            for k, probability in enumerate(probabilities):
                row += [f"{probability:.6f}", int(probability >= thresholds[k])]
                if k in labeled:
                    row.append("" if labels[k] < 0 else int(labels[k]))
            writer.writerow(row)
    if not scored.rejected:
        return None
    rejected = path.with_name(f"{path.stem}.rejected.csv")
    with atomic_writer(rejected, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "reason"])
        writer.writerows([key, reason] for _, key, reason in scored.rejected)
    return rejected


def metrics(model: MemeModel, scored: Scored) -> dict[str, Any]:
    """Per target with labels: binary metrics at the bundle's threshold; with several targets, the
    multi-label scores over the memes that have every label (MAMI task B)."""
    if not scored.ids:
        return {}
    probabilities, labels = np.stack(scored.probabilities), np.stack(scored.labels)
    found: dict[str, Any] = {}
    for k, name in enumerate(model.targets):
        known = labels[:, k] >= 0
        if known.any():
            found[name] = binary_metrics(labels[known, k], probabilities[known, k], model.thresholds[k])
    if len(model.targets) > 1 and (labels >= 0).all(axis=1).any():
        every = (labels >= 0).all(axis=1)
        found["multilabel"] = multilabel_metrics(
            labels[every], probabilities[every], model.targets, model.thresholds
        )
    return found


def _score(model: MemeModel, pending: list, scored: Scored) -> None:
    positions, ids, pixels, texts, labels = zip(*pending)
    batch = model.collate(list(pixels), list(texts), list(ids))
    probabilities = model.predict_batch(batch).numpy()
    scored.order.extend(positions)
    scored.ids.extend(ids)
    scored.probabilities.extend(probabilities)
    scored.labels.extend(np.asarray(row) for row in labels)


def gather(scored: Scored) -> Scored:
    """Every process's scores on every process, in input order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scored.merge([scored])
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, scored)
    return scored.merge(parts)
