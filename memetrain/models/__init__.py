"""Models: timm image backbones, text encoders, unimodal and fusion heads, and the classifier.

Builders take a configuration's options as keyword arguments and turn an unknown kind or option
into a :class:`ConfigError` that lists what is accepted::

    build_classifier(
        num_outputs=1,
        image={"name": "resnet50", "pretrained": True},  # timm's default tag, from the hub cache
        text={"kind": "lstm", "vocab_size": 8000},
        head={"kind": "cross", "dim": 64},
    )
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from memetrain.errors import ConfigError
from memetrain.models.classifier import Classifier
from memetrain.models.fusion import AlignFusion, ConcatFusion, CrossFusion, LateFusion
from memetrain.models.heads import LinearHead, MLPHead
from memetrain.models.image import ImageEncoder, ImageNormalizer
from memetrain.models.text import LSTMTextEncoder, TransformerTextEncoder
from memetrain.models.weights import load_weights, read_state_dict
from memetrain.options import call_with_options

FUSIONS = {"late": LateFusion, "concat": ConcatFusion, "align": AlignFusion, "cross": CrossFusion}
HEADS = {"linear": LinearHead, "mlp": MLPHead}
TEXT_ENCODERS = ("lstm", "transformer")
# TransformerTextEncoder.from_config's options that pretrained weights fix instead
ARCHITECTURE = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
    "dropout", "padding_idx",
)  # fmt: skip

log = logging.getLogger(__name__)

__all__ = [
    "AlignFusion",
    "Classifier",
    "ConcatFusion",
    "CrossFusion",
    "ImageEncoder",
    "ImageNormalizer",
    "LSTMTextEncoder",
    "LateFusion",
    "LinearHead",
    "MLPHead",
    "TransformerTextEncoder",
    "build_classifier",
    "build_fusion",
    "build_head",
    "build_image_encoder",
    "build_text_encoder",
    "load_weights",
    "read_state_dict",
]


def build_image_encoder(**cfg: Any) -> ImageEncoder:
    """An :class:`ImageEncoder`; ``cfg`` holds its arguments (``name``, ``image_size``, ``pretrained`` ...)."""
    return call_with_options(ImageEncoder, cfg, "image encoder")


def build_text_encoder(kind: str, **cfg: Any) -> LSTMTextEncoder | TransformerTextEncoder:
    """``lstm`` or ``transformer``. A transformer with ``pretrained`` (a Hugging Face model id or a
    local model directory) takes its architecture from the weights: the from-scratch options
    (``ARCHITECTURE``: ``hidden_size``, ``num_layers`` ...) are then not used; ``pooling``,
    ``grad_checkpointing`` and ``freeze`` apply."""
    if kind == "lstm":
        return call_with_options(LSTMTextEncoder, cfg, "lstm text encoder")
    if kind == "transformer":
        path = cfg.pop("pretrained", None)
        if path is None:
            return call_with_options(TransformerTextEncoder.from_config, cfg, "transformer text encoder")
        unused = {name: cfg.pop(name) for name in ARCHITECTURE if name in cfg}
        if any(value is not None for value in unused.values()):
            log.info("model.text.pretrained=%s gives the architecture; not used: %s", path, unused)
        return call_with_options(
            TransformerTextEncoder.from_pretrained,
            {"path": path, **cfg},
            "pretrained transformer text encoder",
        )
    raise ConfigError(f"unknown text encoder kind {kind!r}; choose one of {', '.join(TEXT_ENCODERS)}")


def build_fusion(kind: str, image_dim: int, text_dim: int, num_outputs: int, **cfg: Any) -> nn.Module:
    """A fusion head (``late``, ``concat``, ``align``, ``cross``) over ``[B, image_dim]`` and ``[B, text_dim]``."""
    if kind not in FUSIONS:
        raise ConfigError(f"unknown fusion kind {kind!r}; choose one of {', '.join(FUSIONS)}")
    options = dict(image_dim=image_dim, text_dim=text_dim, num_outputs=num_outputs, **cfg)
    return call_with_options(FUSIONS[kind], options, f"{kind} fusion head")


def build_head(kind: str, in_dim: int, num_outputs: int, **cfg: Any) -> MLPHead:
    """A unimodal head (``linear`` or ``mlp``) over ``[B, in_dim]``."""
    if kind not in HEADS:
        raise ConfigError(f"unknown unimodal head kind {kind!r}; choose one of {', '.join(HEADS)}")
    return call_with_options(HEADS[kind], dict(in_dim=in_dim, num_outputs=num_outputs, **cfg), f"{kind} head")


def build_classifier(
    num_outputs: int,
    head: dict[str, Any],
    image: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
) -> Classifier:
    """Encoders from ``image`` and ``text`` (either may be None), and a head of ``head["kind"]``:
    a fusion kind when both encoders are given, a unimodal kind (``linear``, ``mlp``) otherwise."""
    image_encoder = build_image_encoder(**image) if image else None
    text_encoder = build_text_encoder(**text) if text else None
    encoders = [encoder for encoder in (image_encoder, text_encoder) if encoder is not None]
    options = dict(head)
    kind = options.pop("kind", None)
    if len(encoders) == 2:
        if kind not in FUSIONS:
            raise ConfigError(
                f"head kind {kind!r} cannot combine an image and a text encoder; choose one of {', '.join(FUSIONS)}"
            )
        head_module = build_fusion(kind, image_encoder.out_dim, text_encoder.out_dim, num_outputs, **options)
    elif len(encoders) == 1:
        if kind not in HEADS:
            raise ConfigError(
                f"head kind {kind!r} needs both an image and a text encoder; with one encoder choose one of "
                f"{', '.join(HEADS)}"
            )
        head_module = build_head(kind, encoders[0].out_dim, num_outputs, **options)
    else:
        raise ConfigError(
            "a classifier needs an image encoder, a text encoder or both; configure image or text"
        )
    return Classifier(head_module, image_encoder, text_encoder)
