"""Zero-shot classification with a CLIP-style method: no training on labels, only prompts.

Each class of a label gets prompt templates (``eval.zero_shot.prompts``: a 0/1 label its
``negative`` and ``positive`` prompts, "a meme" vs "a hateful meme"; a class-id label one list per
class name). Their text-tower embeddings, L2-normalised and averaged per class (prompt ensembling,
as in Radford et al. 2021, sec. 3.1.4) and normalised again, are compared by cosine similarity with
each meme's embedding (``eval.zero_shot.embed``: ``image``, the image tower alone, or ``image_text``:
the normalised sum of the meme's image and caption embeddings); a softmax over the classes of the
similarities times the method's logit scale gives the probabilities that the metrics score.

A method takes part by having ``embed_prompts(batch)`` (normalised text embeddings of a batch that
carries ``text`` and, for a tower with our tokenizer, ``input_ids``/``attention_mask``),
``zero_shot_embed(batch, kind)`` and ``logit_scale()``, as :class:`memetrain.methods.clip.Clip`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memetrain.data.tokenizer import TextEncoder
from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDS = ("image", "image_text")
BINARY_CLASSES = ("negative", "positive")


@dataclass(frozen=True)
class ZeroShotSettings:
    """``eval.zero_shot``: what meme embedding is scored, and the prompts of each label's classes."""

    embed: str
    prompts: Mapping[str, Mapping[str, Sequence[str]]]

    def __post_init__(self) -> None:
        if self.embed not in EMBEDS:
            raise ConfigError(f"eval.zero_shot.embed={self.embed!r}: choose one of {', '.join(EMBEDS)}")

    def class_prompts(self, label: str, classes: Sequence[str] | None) -> list[list[str]]:
        """The prompts of each class of ``label`` in class order (``classes`` None: a 0/1 label,
        whose classes are ``negative`` and ``positive``), refused unless every class has some."""
        names = list(BINARY_CLASSES if classes is None else classes)
        given = self.prompts.get(label)
        example = (
            "{negative: [a meme], positive: [a hateful meme]}" if classes is None else "{<class>: [...]}"
        )
        if given is None:
            raise ConfigError(
                f"eval.zero_shot.prompts has no prompts for label {label!r}: add "
                f"eval.zero_shot.prompts.{label}={example}, or drop zero_shot from eval.protocols"
            )
        wrong = sorted(set(given) ^ set(names))
        empty = [name for name in names if name in given and not list(given[name])]
        if wrong or empty:
            raise ConfigError(
                f"eval.zero_shot.prompts.{label} must give one or more prompts for each of {names} and nothing "
                f"else; it has {sorted(given)} (empty: {empty})"
            )
        return [[str(prompt) for prompt in given[name]] for name in names]


def check_method(method) -> None:
    """Refuse a method without the zero-shot hooks (no text tower in the image's space)."""
    hooks = ("embed_prompts", "zero_shot_embed", "logit_scale")
    if not all(callable(getattr(method, hook, None)) for hook in hooks):
        raise ConfigError(
            f"eval protocol zero_shot needs a CLIP-style method (image and text towers in one space); "
            f"method {method.name} has none: drop zero_shot from eval.protocols"
        )


@torch.no_grad()
def class_embeddings(method, prompts: list[list[str]], encoder: TextEncoder | None, device) -> torch.Tensor:
    """``[K, D]``: per class, the normalised mean of its prompts' normalised text embeddings."""
    texts = [text for group in prompts for text in group]
    batch: dict[str, Any] = {"text": texts}
    if encoder is not None:
        ids, mask = encoder(texts)
        batch["input_ids"] = torch.as_tensor(ids, device=device)
        batch["attention_mask"] = torch.as_tensor(mask, device=device)
        _warn_unknown_words(encoder, texts, ids, mask)
    method.eval()
    try:
        embedded = method.embed_prompts(batch).float()  # [T, D], normalised
        scale = float(method.logit_scale())
    finally:
        method.train()
    bounds = np.cumsum([0] + [len(group) for group in prompts])
    means = torch.stack([embedded[lo:hi].mean(0) for lo, hi in zip(bounds[:-1], bounds[1:])])
    return F.normalize(means, dim=-1) * scale  # the scale folded in: logits = features @ this.T


def probabilities(features: np.ndarray, classes: torch.Tensor) -> np.ndarray:
    """``[N, K]`` softmax over the classes of the scaled cosine similarities."""
    logits = torch.as_tensor(features, dtype=torch.float32) @ classes.float().cpu().T
    return torch.softmax(logits, dim=1).numpy().astype(np.float64)


def _warn_unknown_words(encoder: TextEncoder, texts: list[str], ids: np.ndarray, mask: np.ndarray) -> None:
    unk = encoder.unk_id
    for text, row, keep in zip(texts, ids, mask):
        unknown = int(((row == unk) & (keep == 1)).sum()) if unk is not None else 0
        if unknown:
            log.warning(
                "zero-shot prompt %r has %d token(s) the tokenizer does not know ([UNK]): those words were "
                "never in the training texts, and the text tower cannot read them",
                text,
                unknown,
            )
