"""Frozen CLIP features for the methods that classify over them (SemiMemes, TIB-VA, CMML-CLIP).

Every such method takes a ``clip`` option block: the options of ``method=clip`` plus ``weights``.
``tower: memetrain`` reads our own CLIP run (same ``model`` config; ``weights`` its
``checkpoints/step_N/model.safetensors``); ``tower: open_clip`` builds an open_clip model
(``open_clip_model``) with the weights ``open_clip_weights`` names: an open_clip pretrained tag
(``openai``, ``laion2b_s34b_b88k`` ..., through open_clip's hub code and the Hugging Face cache) or a
local file (:mod:`memetrain.models.open_clip_weights`). The towers never train and stay in eval mode;
features are L2-normalised, as CLIP compares them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.methods.base import Batch
from memetrain.methods.clip import Clip
from memetrain.methods.registry import DataInfo
from memetrain.models.hub import RECORD, remember
from memetrain.models.weights import load_weights
from memetrain.options import call_with_options


class FrozenClip(nn.Module):
    """A trained CLIP's towers, frozen: ``forward(batch) -> (image, text)`` features ``[B, D]`` each.

    It holds the CLIP's ``model`` under the same name, so a method's state dict keeps the keys
    ``clip.model.*`` of a CLIP run's checkpoint.
    """

    def __init__(self, clip: Clip):
        super().__init__()
        self.model = clip.model
        self.embed_dim = clip.embed_dim
        self.requires_grad_(False).eval()
        record = getattr(clip, RECORD, None)  # the checkpoint loaded over the whole CLIP
        if record is not None:
            remember(self, record)

    def train(self, mode: bool = True) -> FrozenClip:
        """Always eval: batch-norm statistics and dropout stay as CLIP trained them."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """As :meth:`Clip.encode_image` and :meth:`Clip.encode_text`: projected, L2-normalised."""
        image = F.normalize(self.model.encode_image(batch), dim=-1)
        return image, F.normalize(self.model.encode_text(batch), dim=-1)


def frozen_clip(model: dict[str, Any], data: DataInfo, options: dict[str, Any], method: str) -> FrozenClip:
    """The CLIP of ``options`` (``method.clip``) with its weights loaded (strictly), frozen."""
    options = dict(options)
    tower = options.get("tower", "memetrain")
    weights = options.pop("weights", None)
    if tower == "memetrain" and weights is None:
        raise ConfigError(
            f"{method} reads frozen CLIP features: set method.clip.weights to a CLIP run's "
            "checkpoints/step_N/model.safetensors (train one with method=clip and the same model config)"
        )
    if tower == "open_clip" and (weights is not None or options.get("open_clip_weights") is None):
        raise ConfigError(
            "with method.clip.tower=open_clip the weights come from method.clip.open_clip_weights "
            "(an open_clip pretrained tag such as openai, or a local file); leave method.clip.weights null"
        )
    clip = call_with_options(Clip, dict(model=model, data=data, **options), "method.clip")
    if weights is not None:
        load_weights(clip, weights)
    return FrozenClip(clip)
