"""Several packed datasets in one training stream, each upsampled by a weight (``data.mix``).

``data.mix: [{shards: shards/synth_hard, weight: 1}, {shards: shards/synth, weight: 2}]`` makes the
label-free stages (pretraining; the unlabeled part of a semi-supervised stage) stream every listed
pack. As open_clip's ``--train-data-upsampling-factors``, a weight is an upsampling factor: a pack's
share of the memes is proportional to weight x its size, so equal weights see every meme equally
often, as one concatenated corpus would, and weight 2 shows a pack's memes twice as often.

Each step's batch holds a fixed number of memes of every pack (its quota: the batch size split by
those shares, largest remainders first; one that rounds to none is refused), streamed by one :class:`MemeStream` per
pack with its own epochs; a small pack upsampled repeats its epochs more often. So the plan of every
pack is a pure function of (seed, epoch) as a single stream's is, and the mixed stream resumes
exactly: its state is its packs' states. Labels are hidden (-1): the mix is for label-free training,
and packs need not share their label columns. The run's tokenizer encodes every pack's texts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memetrain.data.manifest import Manifest
from memetrain.data.semi_supervised import concatenate
from memetrain.data.stream import MemeStream
from memetrain.data.stream_error import StreamError
from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1
KEYS = {"shards", "weight", "splits"}


@dataclass(frozen=True)
class MixSource:
    """One pack of ``data.mix``: its directory, upsampling weight and the splits it streams."""

    shards: str
    weight: float
    splits: tuple[str, ...]


def parse_mix(entries: Sequence[Mapping[str, Any]], default_splits: Sequence[str]) -> list[MixSource]:
    """``data.mix`` checked against the packs it names. An entry without ``splits`` streams those
    of ``default_splits`` (the data config's train and unlabeled splits) that its pack has."""
    if not entries:
        raise ConfigError(
            "data.mix is empty: list the packs, e.g. [{shards: shards/synth, weight: 1}], or set null"
        )
    sources = []
    for i, entry in enumerate(entries):
        where = f"data.mix[{i}]"
        if not isinstance(entry, Mapping) or not {"shards", "weight"} <= set(entry) or set(entry) - KEYS:
            raise ConfigError(
                f"{where}={entry!r}: give {{shards: <pack directory>, weight: <upsampling factor>}} (and "
                "optionally splits: [...]), nothing else"
            )
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(
                f"{where}.weight={weight!r}: give a positive number (1: the pack's natural share)"
            )
        manifest = Manifest.load(entry["shards"])
        if entry.get("splits") is None:
            splits = [split for split in default_splits if split in manifest.splits]
        else:
            splits = list(entry["splits"])
            missing = [split for split in splits if split not in manifest.splits]
            if missing:
                raise ConfigError(
                    f"{where}.splits names {missing}, which the pack at {entry['shards']} does not have (it has "
                    f"{', '.join(manifest.splits)})"
                )
        if not splits:
            raise ConfigError(
                f"{where}: the pack at {entry['shards']} has none of the splits {list(default_splits)}; name "
                f"its splits with {where}.splits=[...] (it has {', '.join(manifest.splits)})"
            )
        sources.append(MixSource(str(entry["shards"]), float(weight), tuple(splits)))
    if len({Path(source.shards).resolve() for source in sources}) != len(sources):
        raise ConfigError("data.mix lists a pack twice: give each pack once, with its weight")
    return sources


def batch_quotas(weights: Sequence[float], sizes: Sequence[int], batch_size: int) -> list[int]:
    """Memes of each pack in a batch of ``batch_size``: shares proportional to weight x size, rounded
    by largest remainder (ties to the earlier pack); a pack whose quota rounds to none is refused."""
    shares = np.asarray(weights, dtype=np.float64) * np.asarray(sizes, dtype=np.float64)
    exact = batch_size * shares / shares.sum()
    quotas = np.floor(exact).astype(np.int64)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: batch_size - int(quotas.sum())]:
        quotas[i] += 1
    if (quotas == 0).any():
        small = [i for i, q in enumerate(quotas) if q == 0]
        raise ConfigError(
            f"data.mix: packs {small} get no meme of a batch of {batch_size} (shares {np.round(exact, 2).tolist()}); "
            "raise their weights or data.batch_size"
        )
    return quotas.tolist()


class MixedStream:
    """One batch of each pack's stream per step, concatenated (pack order), labels hidden.

    Iterating never ends (the trainer draws the steps it needs); ``counts`` holds the memes each
    pack delivered, which the log reports whenever a pack completes an epoch.
    """

    def __init__(self, streams: Sequence[MemeStream], names: Sequence[str], label_columns: int):
        if len(streams) != len(names) or not streams:
            raise ValueError("one name per stream, and at least one stream")
        self.streams, self.names, self.label_columns = list(streams), list(names), label_columns
        self.quotas = [stream.settings.batch_size for stream in self.streams]
        self.counts = [0] * len(self.streams)
        parts = [f"{name} ({quota}/batch)" for name, quota in zip(self.names, self.quotas)]
        self.split = "mix of " + " + ".join(parts)
        self.num_samples = sum(stream.num_samples for stream in self.streams)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = [self._forever(i) for i in range(len(self.streams))]
        while True:
            parts = [next(iterator) for iterator in iterators]
            for i, part in enumerate(parts):
                self.counts[i] += int(part["valid"].sum())
            yield reduce(concatenate, parts)

    def _forever(self, i: int) -> Iterator[dict[str, Any]]:
        stream = self.streams[i]
        while True:
            for batch in stream:
                rows = len(batch["id"])
                batch["labels"] = torch.full((rows, self.label_columns), -1, dtype=batch["labels"].dtype)
                batch["label"] = torch.full((rows,), -1, dtype=batch["label"].dtype)
                yield batch
            log.info("data.mix: %s finished epoch %d; %s", self.names[i], stream.epoch, self.report())

    def report(self) -> str:
        """Memes delivered so far per pack, and in epochs of that pack."""
        return ", ".join(
            f"{name}: {count} memes ({count / stream.num_samples:.2f} epochs)"
            for name, count, stream in zip(self.names, self.counts, self.streams)
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "mix": list(self.names),
            "quotas": list(self.quotas),
            "counts": list(self.counts),
            "streams": [stream.state_dict() for stream in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or "mix" not in state:
            raise StreamError(
                "cannot resume: the checkpoint's stream is not a data.mix stream (was data.mix changed?); resume "
                "with the same settings or start a new run"
            )
        if state["mix"] != self.names or state["quotas"] != self.quotas:
            raise StreamError(
                f"cannot resume the stream: it mixed {state['mix']} at {state['quotas']} memes per batch and now "
                f"mixes {self.names} at {self.quotas}; resume with the same data.mix and batch size"
            )
        for stream, saved in zip(self.streams, state["streams"]):
            stream.load_state_dict(saved)
        self.counts = list(state["counts"])
