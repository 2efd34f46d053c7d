"""What one run reads: its pack, splits, label fraction, dev split and streams (``cfg.data``).

A data config names splits of the pack (``train_split``, ``dev_split``, ``eval_splits``,
``unlabeled_splits``), and one more split that no pack holds: with ``dev_from_train`` set, a
stratified, seeded share of the train split is held out as :data:`CARVED_DEV` (``train_dev``; MAMI
has no dev split, and its studies validate on such a carve). Those memes are then never trained on,
with labels or without, and the label fraction is drawn from the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from memetrain.data.manifest import Manifest
from memetrain.data.mix import MixedStream, batch_quotas, parse_mix
from memetrain.data.semi_supervised import SemiSupervisedStream
from memetrain.data.stream import MemeStream, StreamSettings, split_labels
from memetrain.data.tokenizer import TextEncoder
from memetrain.errors import ConfigError
from memetrain.eval.fractions import TrainDevSplit, dev_from_train, label_fraction_indices
from memetrain.methods import Stage

CARVED_DEV = "train_dev"


class RunData:
    """The streams of one run over ``data.shards``, seeded by the run's ``seed``."""

    def __init__(self, data: DictConfig, seed: int):
        self.data, self.seed = data, seed
        self.manifest = Manifest.load(data.shards)
        self.carve: TrainDevSplit | None = None
        if data.dev_from_train:
            binary = [self.manifest.label_names.index(name) for name in self.manifest.binary_labels()]
            train_labels = split_labels(data.shards, data.train_split)[:, binary]  # [N, L]: 0/1 strata
            self.carve = dev_from_train(train_labels, data.dev_from_train, data.dev_from_train_seed)
        self.tokenizer = self._tokenizer_path()
        self.encoder = (
            TextEncoder(self.tokenizer, data.max_length, clean=data.clean_text) if self.tokenizer else None
        )

    def check_splits(self, stages: list[Stage]) -> None:
        """Every split the run reads must be in the pack (the unlabeled ones only if a stage trains
        without labels; the carved dev split only with ``dev_from_train``), or the run stops here."""
        data = self.data
        label_free = any(stage.reads_unlabeled for stage in stages)
        named = {
            "data.train_split": [data.train_split],
            "data.dev_split": [data.dev_split] if data.dev_split else [],
            "data.eval_splits": list(data.eval_splits),
            "data.unlabeled_splits": list(data.unlabeled_splits) if label_free and not data.mix else [],
        }
        if label_free and data.mix:  # the packs label-free stages stream instead (data/mix.py)
            parse_mix(data.mix, [data.train_split, *data.unlabeled_splits])
        have = [*self.manifest.splits, *([CARVED_DEV] if self.carve is not None else [])]
        for option, splits in named.items():
            missing = [split for split in splits if split not in have]
            if missing:
                hint = {
                    "data.unlabeled_splits": " or [] (for SynthMemes, pack with unlabeled=N)",
                    "data.dev_split": f" ({CARVED_DEV}: set data.dev_from_train=0.1 to carve one from train)",
                }.get(option, "")
                raise ConfigError(
                    f"{option} names {missing}, which the pack at {self.manifest.root} does not have (it has "
                    f"{', '.join(have)}); set {option} to splits it has{hint}"
                )

    def targets(self) -> list[str]:
        """``data.targets``: the label columns probes fit and classifiers predict (the main label if null)."""
        manifest = self.manifest
        targets = list(self.data.targets or [manifest.main_label])
        unknown = [name for name in targets if name not in manifest.label_names]
        if unknown or len(set(targets)) != len(targets):
            raise ConfigError(
                f"data.targets={targets}: each must be one label of the pack at {manifest.root}, once "
                f"(it has {', '.join(manifest.label_names)}); MAMI task B is data=mami_task_b"
            )
        classes = [name for name in targets if name in manifest.label_classes]
        if classes:
            raise ConfigError(
                f"data.targets={targets}: {classes} hold class ids, not 0/1 labels a classifier predicts; "
                f"probe them with eval.targets={classes}"
            )
        return targets

    def labeled_subset(self) -> np.ndarray:
        """The training memes whose labels a supervised objective may use: ``label_fraction`` of the
        labeled ones (outside a carved dev split), stratified and nested across fractions (the 5 %
        set is inside the 10 % set)."""
        manifest = self.manifest
        labels = split_labels(self.data.shards, self.data.train_split)[
            :, manifest.label_names.index(manifest.main_label)
        ]
        if self.carve is not None:
            return self.carve.labeled_fraction(labels, self.data.label_fraction, self.seed)
        return label_fraction_indices(labels, self.data.label_fraction, self.seed)

    def monitor_bank(self, view, size: int) -> MemeStream:
        """At most ``size`` memes of the labeled fraction (a seeded choice) for the online monitors."""
        chosen = self.labeled_subset()
        if len(chosen) > size:
            chosen = np.sort(np.random.default_rng([self.seed, size]).choice(chosen, size, replace=False))
        return self.stream(self.data.train_split, view, subset=chosen)

    def labeled_labels(self) -> np.ndarray:
        """Every label column ``[N, L]`` of the memes :meth:`labeled_subset` chooses."""
        return split_labels(self.data.shards, self.data.train_split)[self.labeled_subset()]

    def train_stream(self, stage: Stage, view) -> MemeStream | SemiSupervisedStream:
        """What ``stage`` trains on: the labeled fraction, every meme (label-free), or both in each batch."""
        if not stage.needs_labels:
            return self._everything(view)
        labeled = self.stream(self.data.train_split, view, train=True, subset=self.labeled_subset())
        if stage.unlabeled_ratio == 0:
            return labeled
        batch_size = max(1, round(stage.unlabeled_ratio * self.data.batch_size))
        return SemiSupervisedStream(labeled, self._everything(view, batch_size))

    def stream(
        self,
        split: str | list[str],
        view,
        train: bool = False,
        subset: np.ndarray | None = None,
        batch_size: int | None = None,
        shards: str | None = None,
    ) -> MemeStream:
        """Training streams shuffle and drop the last partial batch; evaluation streams see every
        meme once. :data:`CARVED_DEV` streams the held-out memes of the train split. ``shards``:
        another pack than ``data.shards`` (a ``data.mix`` pack)."""
        if split == CARVED_DEV:
            split, subset = self.data.train_split, self.carve.dev
        data = self.data
        settings = StreamSettings(
            batch_size=batch_size or data.batch_size,
            seed=self.seed,
            shuffle=train,
            shuffle_buffer=data.shuffle_buffer,
            drop_last=train,
            num_workers=data.num_workers,
            worker_kind=data.worker_kind,
            pin_memory=torch.cuda.is_available(),
            max_bad_samples=data.max_bad_samples,
            verify_checksums=data.verify_checksums,
        )
        return MemeStream(shards or data.shards, split, settings, view, self.encoder, subset=subset)

    def _everything(self, view, batch_size: int | None = None) -> MemeStream | MixedStream:
        """Every training meme and the unlabeled splits' (a carved dev split's memes left out), or
        with ``data.mix`` the packs it lists."""
        if self.data.mix:
            return self._mixed(view, batch_size)
        splits = [self.data.train_split, *self.data.unlabeled_splits]
        return self.stream(splits, view, train=True, subset=self._uncarved(splits), batch_size=batch_size)

    def _uncarved(self, splits: list[str]) -> np.ndarray | None:
        """Split-wide indices over ``splits`` of this pack, in this order, without a carved dev
        split's memes (None: all of them)."""
        if self.carve is None or self.data.train_split not in splits:
            return None
        parts, start = [], 0
        for name in splits:
            samples = self.manifest.split(name).samples
            kept = self.carve.train if name == self.data.train_split else np.arange(samples)
            parts.append(start + kept)
            start += samples
        return np.concatenate(parts)

    def _mixed(self, view, batch_size: int | None = None) -> MixedStream:
        """``data.mix``: each pack's quota of every batch by its weight x size (memetrain/data/mix.py)."""
        sources = parse_mix(self.data.mix, [self.data.train_split, *self.data.unlabeled_splits])
        own = Path(self.data.shards).resolve()
        subsets = [
            self._uncarved(list(s.splits)) if Path(s.shards).resolve() == own else None for s in sources
        ]
        sizes = [
            len(subset)
            if subset is not None
            else sum(Manifest.load(s.shards).split(n).samples for n in s.splits)
            for s, subset in zip(sources, subsets)
        ]
        quotas = batch_quotas([s.weight for s in sources], sizes, batch_size or self.data.batch_size)
        streams = [
            self.stream(list(s.splits), view, train=True, subset=subset, batch_size=quota, shards=s.shards)
            for s, subset, quota in zip(sources, subsets, quotas)
        ]
        return MixedStream(streams, [s.shards for s in sources], len(self.manifest.label_names))

    def _tokenizer_path(self) -> Path | None:
        """``data.tokenizer``, or the tokenizer packed with the shards."""
        manifest = self.manifest
        path = self.data.tokenizer or (manifest.root / manifest.tokenizer if manifest.tokenizer else None)
        return Path(path) if path else None
