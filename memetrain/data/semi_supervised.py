"""Labeled and unlabeled memes in every batch, for objectives that train on both at once (CMML).

A stage with ``unlabeled_ratio`` μ > 0 (:class:`memetrain.methods.Stage`) streams, per step,
``data.batch_size`` memes of the labeled fraction followed by μ × ``data.batch_size`` memes drawn
from every training meme and the unlabeled splits with their labels hidden (-1), as FixMatch's
μ (Sohn et al. 2020). The two parts are separate :class:`MemeStream` s, each with its own epochs:
at 5 % labels the labeled part repeats about twenty times as often as the other, and every step
still sees a full batch of labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from memetrain.data.stream import MemeStream, StreamError

STATE_VERSION = 1


class SemiSupervisedStream:
    """One batch of ``labeled`` then one of ``unlabeled`` (labels set to -1), concatenated row-wise.

    Iterating never ends (the trainer draws the steps it needs); ``state_dict()`` holds both
    streams' positions, so a resumed run continues with exactly the batches it would have seen.
    """

    def __init__(self, labeled: MemeStream, unlabeled: MemeStream):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.split = f"{labeled.split} ({labeled.num_samples} labeled) + {unlabeled.split} (labels hidden)"
        self.num_samples = labeled.num_samples + unlabeled.num_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for labeled, unlabeled in zip(_forever(self.labeled), _forever(self.unlabeled)):
            unlabeled["labels"] = torch.full_like(unlabeled["labels"], -1)
            unlabeled["label"] = torch.full_like(unlabeled["label"], -1)
            yield concatenate(labeled, unlabeled)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "labeled": self.labeled.state_dict(),
            "unlabeled": self.unlabeled.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or "unlabeled" not in state:
            raise StreamError(
                "cannot resume: the checkpoint's stream is not a labeled + unlabeled stream (was the "
                "stage's unlabeled_ratio changed?); resume with the same settings or start a new run"
            )
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])


def concatenate(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two batches as one, rows of ``first`` first: tensors and lists of view tensors are
    concatenated along the batch dimension, other lists (ids, texts) joined."""
    if first.keys() != second.keys():
        raise StreamError(
            f"batches with different fields cannot be joined: {sorted(first)} vs {sorted(second)}"
        )
    joined = {}
    for name, value in first.items():
        if torch.is_tensor(value):
            joined[name] = torch.cat([value, second[name]])
        elif isinstance(value, list) and value and torch.is_tensor(value[0]):
            joined[name] = [torch.cat(pair) for pair in zip(value, second[name])]
        else:
            joined[name] = value + second[name]
    return joined


def _forever(stream: MemeStream) -> Iterator[dict[str, Any]]:
    while True:
        yield from stream
