"""Hate-CLIPper over frozen CLIP towers (Kumar and Nandakumar, "Hate-CLIPper: Multimodal Hateful Meme
Classification based on Cross-modal Interaction of CLIP Features", 2022), as its code runs it
(gokulkarthik/hateclipper ``engine.py``; ``run.sh``): CLIP's image and text towers frozen
(``freeze_image_encoder t``), each pooled output mapped to ``map_dim`` (Linear, Dropout),
L2-normalised, combined by ``fusion`` (``cross``: the feature interaction matrix, flattened;
``align``: its diagonal, the element-wise product; ``concat``: an MLP over both, the code's other
baseline), then dropout, ``num_pre_output_layers``
(Linear, ReLU, Dropout) and one output per target: :mod:`memetrain.models.fusion`'s heads.

``features: pooled`` (the paper's) reads the towers' pooled outputs before CLIP's projections, as
the code's ``vision_model(...).pooler_output`` and ``text_model(...).pooler_output`` do (open_clip:
the vision tower without ``proj``, the text tower's end-of-text state after ``ln_final``);
``projected`` reads CLIP's projected embeddings. The frozen towers are any ``method.clip``
(:mod:`memetrain.methods.frozen_clip`; the paper's: OpenAI ViT-L/14, ``ViT-L-14`` + ``openai``).
Training (AdamW lr 1e-4, weight decay 1e-4, gradient clipping 0.1, batch 16, 20 epochs, map_dim 32,
drop probabilities 0.2 / 0.4 / 0.1: ``main.py`` 44-71 and ``run.sh``) is the sweep's recipe.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memetrain.errors import ConfigError
from memetrain.methods.base import Batch, Method
from memetrain.methods.clip_features import clip_features, text_token_states
from memetrain.methods.frozen_clip import FrozenClip, frozen_clip
from memetrain.methods.objective import ClassificationObjective
from memetrain.methods.registry import DataInfo, register
from memetrain.models.fusion import AlignFusion, ConcatFusion, CrossFusion


def _concat(image_dim, text_dim, outputs, dim, depth, projection_dropout, fusion_dropout, dropout):
    """Concatenation fusion: an MLP (``depth`` layers of ``dim``) over ``[image, text]``."""
    return ConcatFusion(image_dim, text_dim, outputs, hidden_dim=dim, depth=depth, dropout=dropout)


FUSIONS = {"align": AlignFusion, "cross": CrossFusion, "concat": _concat}


@register
class HateClipper(Method):
    """Options (``configs/method/hate_clipper.yaml``): ``clip``, ``fusion``, ``features``, ``map_dim``,
    ``num_pre_output_layers``, ``drop_probs`` [map, fusion, pre-output], ``targets``, ``loss``, ``focal_gamma``."""

    name = "hate_clipper"
    needs_labels = True

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        clip: dict[str, Any],
        fusion: str = "cross",
        features: str = "pooled",
        map_dim: int = 32,
        num_pre_output_layers: int = 1,
        drop_probs: tuple[float, float, float] = (0.2, 0.4, 0.1),
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if fusion not in FUSIONS or features not in ("pooled", "projected") or len(drop_probs) != 3:
            raise ConfigError(
                f"method.fusion={fusion!r} (align | cross | concat), method.features={features!r} (pooled | projected) "
                f"or method.drop_probs={list(drop_probs)} (3 probabilities: map, fusion, pre-output) is not known"
            )
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma)
        self.targets = self.objective.targets
        self.clip = frozen_clip(model, data, clip, "Hate-CLIPper")
        self.pooled = features == "pooled"
        image_dim, text_dim = _widths(self.clip, self.pooled)
        map_drop, fusion_drop, pre_drop = drop_probs
        self.head = FUSIONS[fusion](
            image_dim,
            text_dim,
            len(self.targets),
            dim=map_dim,
            depth=num_pre_output_layers,
            projection_dropout=map_drop,
            fusion_dropout=fusion_drop,
            dropout=pre_drop,
        )

    def features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The frozen towers' outputs ``[B, Di]``, ``[B, Dt]``: pooled (before the projections) or projected."""
        if not self.pooled:
            return clip_features(self.clip, batch, normalize=False)
        return _pooled(self.clip, batch)

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.objective(self.predict(batch), batch)

    def embed(self, batch: Batch) -> Tensor:
        return self.head.embed(*self.features(batch))

    def predict(self, batch: Batch) -> Tensor:
        return self.head(*self.features(batch))

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        features = self.embed(batch)
        return features, self.head.output(features)


def _widths(clip: FrozenClip, pooled: bool) -> tuple[int, int]:
    towers = clip.model
    if not pooled:
        return clip.embed_dim, clip.embed_dim
    if hasattr(towers, "clip"):  # open_clip: the vision and text transformers' widths
        visual = towers.clip.visual
        width = visual.proj.shape[0] if getattr(visual, "proj", None) is not None else clip.embed_dim
        return width, towers.clip.transformer.width
    return towers.image_encoder.out_dim, towers.text_encoder.out_dim


@torch.no_grad()
def _pooled(clip: FrozenClip, batch: Batch) -> tuple[Tensor, Tensor]:
    """The towers' pooled outputs before CLIP's projections (Hugging Face's ``pooler_output``)."""
    towers = clip.model
    if not hasattr(towers, "clip"):  # our CLIP: the encoders before their projections
        return towers.image_encoder(batch["image"]), towers.text_encoder(
            batch["input_ids"], batch["attention_mask"]
        )
    model = towers.clip
    visual = model.visual
    proj, visual.proj = visual.proj, None  # the vision tower's pooled, LayerNorm'd output without proj
    try:
        dtype = next(visual.parameters()).dtype
        image = visual(towers.normalize(batch["image"], dtype))
    finally:
        visual.proj = proj
    states, _ = text_token_states(clip, batch)  # [B, L, width], after ln_final
    tokens = towers.tokenizer(batch["text"]).to(states.device)
    text = states[torch.arange(len(states), device=states.device), tokens.argmax(dim=-1)]  # end of text
    return image, text
