"""MMBT: the supervised multimodal bitransformer (Kiela, Bhooshan, Firooz, Testuggine, "Supervised
Multimodal Bitransformers for Classifying Images and Text", 2019, arXiv:1909.02950).

The image encoder's final feature map is average-pooled into ``num_image_tokens`` horizontal bands
(top to bottom), each band is projected linearly to the transformer's width, and the transformer
reads them as tokens in front of the text, in one sequence passed as ``inputs_embeds``:

    token     [CLS]  img_1 ... img_N  [SEP]  |  text_1 ... text_k  [SEP]  [PAD] ...
    segment     0      0   ...   0      0    |    1    ...    1      1      1
    position    0      1   ...   N     N+1   |    0    ...   k-1     k     ...

As in the paper's code, the image part and the text part each count positions from 0 in the
transformer's one position table, so a pretrained BERT sees its text where it was trained to.
[CLS] and [SEP] are the text's own: the tokenizer's leading [CLS] moves to the front and its
closing [SEP] (the last real token) is repeated after the image tokens, so the ids of any BERT-style
tokenizer work unchanged (texts must be right-padded with [CLS] first and [SEP] last, as the packed
WordPiece tokenizer and BERT tokenizers make them). Padding is masked out of attention.

The classifier reads the final [CLS] state (dropout, then linear); the image encoder, the
projection and the transformer all train. Targets, loss and ``init`` are those of
:mod:`memetrain.methods.supervised`.

MMF's MMBT (facebookresearch/mmf ``mmf/models/mmbt.py``), which the paper's Hateful Memes baseline
ran, differs in two places, both options here so that a pretrained BERT sees what it was trained on:

- ``image_segment: 1``: the text keeps segment 0, as BERT's single sentences had it, and the image
  part takes segment 1 (``MMBTBase.forward``: a text of one segment puts the modality at 1; the
  image part counts positions from 0 in front of the text, and the text's restart at 0, as here);
- ``head: mmf``: BERT's pooler (Linear + tanh on the final [CLS] state), dropout, BERT's
  prediction-head transform (Linear, GELU, LayerNorm) and the output layer
  (``MMBTForClassification``). The pooler starts from a pretrained BERT's own pooler (the text
  encoder keeps its weights aside, :attr:`TransformerTextEncoder.pretrained_pooler`).

The defaults (``image_segment: 0``, ``head: linear``) are ours.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.methods.base import Batch, Method
from memetrain.methods.objective import ClassificationObjective
from memetrain.methods.registry import DataInfo, register
from memetrain.models import (
    ImageEncoder,
    TransformerTextEncoder,
    build_image_encoder,
    build_text_encoder,
)
from memetrain.models.weights import load_encoder_inits

HEADS = ("linear", "mmf")


class PredictionHeadTransform(nn.Module):
    """BERT's prediction-head transform (transformers' ``BertPredictionHeadTransform``): Linear,
    GELU, LayerNorm."""

    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.dense, self.act, self.norm = nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


class TokenSequence(NamedTuple):
    """What the transformer reads: embeddings ``[B, T, hidden]``; segments, positions and the
    attention mask ``[B, T]``, with ``T = N + 2 + L - 1`` for ``N`` image tokens and ``L`` text tokens."""

    embeds: Tensor
    segments: Tensor
    positions: Tensor
    mask: Tensor


@register
class MMBT(Method):
    """MMBT classification. Options (``configs/method/mmbt.yaml`` says how to tune them):
    ``num_image_tokens`` (N), ``dropout`` before the output layer, and as in ``supervised``:
    ``targets``, ``loss`` (bce or focal), ``focal_gamma`` and ``init``."""

    name = "mmbt"
    needs_labels = True

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        num_image_tokens: int = 3,
        dropout: float = 0.1,
        image_segment: int = 0,
        head: str = "linear",
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        init: dict[str, dict[str, str] | None] | None = None,
    ):
        super().__init__()
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma)
        self.targets = self.objective.targets
        if num_image_tokens < 1:
            raise ConfigError(
                f"method.num_image_tokens={num_image_tokens}: give at least 1 (the paper's is 3)"
            )
        self.num_image_tokens = num_image_tokens

        image, text = _model_parts(data.complete(model))
        self.image_encoder: ImageEncoder = build_image_encoder(**image)
        self.text_encoder: TransformerTextEncoder = build_text_encoder(**text)
        _check_image_encoder(self.image_encoder, image["name"])
        self.max_positions = _check_transformer(self.text_encoder, num_image_tokens)
        hidden = self.text_encoder.out_dim
        self.image_projection = nn.Linear(self.image_encoder.map_dim, hidden)
        if image_segment not in (0, 1) or head not in HEADS:
            raise ConfigError(
                f"method.image_segment={image_segment} (0 or 1: MMF's is 1) or method.head={head!r} "
                f"(choose {', '.join(HEADS)}) is not known"
            )
        self.image_segment, self.text_segment = image_segment, 1 - image_segment
        eps = getattr(self.text_encoder.model.config, "layer_norm_eps", 1e-12)
        self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if head == "mmf" else nn.Identity()
        if head == "mmf" and self.text_encoder.pretrained_pooler is not None:  # BERT's own, as MMF's starts
            self.pooler[0].load_state_dict(self.text_encoder.pretrained_pooler)
        self.head_transform = PredictionHeadTransform(hidden, eps) if head == "mmf" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden, len(self.targets))
        load_encoder_inits({"image": self.image_encoder, "text": self.text_encoder}, init)

    def image_tokens(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` to ``N`` horizontal bands of the feature map, projected: ``[B, N, hidden]``."""
        features = self.image_encoder.feature_map(images)  # [B, C, h, w]
        bands = F.adaptive_avg_pool2d(features, (self.num_image_tokens, 1))  # [B, C, N, 1]
        return self.image_projection(bands.flatten(2).transpose(1, 2))  # [B, N, hidden]

    def sequence(self, batch: Batch) -> TokenSequence:
        """The image-and-text sequence of the module docstring for ``image``, ``input_ids`` and
        ``attention_mask``."""
        _check_batch(batch)
        ids, text_mask = batch["input_ids"], batch["attention_mask"]  # [B, L] each
        (size, length), image_length = ids.shape, self.num_image_tokens + 2
        if length - 1 > self.max_positions:
            raise ConfigError(
                f"texts of {length} tokens need {length - 1} positions after MMBT moves [CLS] to the front, but "
                f"the transformer has {self.max_positions}; lower data.max_length or use a transformer with more "
                "max_position_embeddings"
            )
        words = self.text_encoder.input_embeddings()
        closing = (text_mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)  # [B, 1]: the last real token, [SEP]
        embeds = torch.cat(
            [
                words(ids[:, :1]),  # [B, 1, hidden]: [CLS]
                self.image_tokens(batch["image"]),  # [B, N, hidden]
                words(ids.gather(1, closing)),  # [B, 1, hidden]: [SEP]
                words(ids[:, 1:]),  # [B, L - 1, hidden]: the text after its [CLS]
            ],
            dim=1,
        )
        positions = torch.cat(
            [torch.arange(image_length, device=ids.device), torch.arange(length - 1, device=ids.device)]
        )  # [T]
        segments = torch.cat(
            [
                ids.new_full((image_length,), self.image_segment),
                ids.new_full((length - 1,), self.text_segment),
            ]
        )  # [T]
        mask = torch.cat([text_mask.new_ones(size, image_length), text_mask[:, 1:]], dim=1)  # [B, T]
        return TokenSequence(embeds, segments.expand(size, -1), positions.expand(size, -1), mask)

    def embed(self, batch: Batch) -> Tensor:
        """The transformer's final [CLS] state ``[B, hidden]`` (with ``model.text.pooling=mean``, the
        mean over the image tokens and the real text tokens instead); with ``head: mmf``, through
        BERT's pooler (what MMF's classifier reads, after dropout)."""
        sequence = self.sequence(batch)
        state = self.text_encoder(
            None,
            sequence.mask,
            inputs_embeds=sequence.embeds,
            token_type_ids=sequence.segments,
            position_ids=sequence.positions,
        )
        return self.pooler(state)

    def classify(self, features: Tensor) -> Tensor:
        """Logits ``[B, targets]`` of :meth:`embed`'s features: dropout, the head transform (``mmf``), output."""
        return self.output(self.head_transform(self.dropout(features)))

    def predict(self, batch: Batch) -> Tensor:
        return self.classify(self.embed(batch))  # [B, targets]

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        features = self.embed(batch)
        return features, self.classify(features)

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.objective(self.predict(batch), batch)


def _model_parts(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model.image`` and ``model.text`` of a model config MMBT can use (``model=mmbt_small``)."""
    if model.get("head") is not None:
        raise ConfigError(
            "MMBT classifies the transformer's [CLS] state with its own output layer, but the model config "
            f"sets head={model['head']}; use model=mmbt_small (or a model config with image and text, no head)"
        )
    if model.get("image") is None:
        raise ConfigError(
            "MMBT needs model.image (a timm backbone for the image tokens); use model=mmbt_small"
        )
    text = model.get("text")
    if text is None or text.get("kind") != "transformer":
        kind = None if text is None else text.get("kind")
        raise ConfigError(
            f"MMBT feeds image tokens through a transformer, so model.text must be of kind transformer, not {kind}; "
            "use model=mmbt_small or model/text=transformer (or model.text.pretrained=<local HF directory>)"
        )
    return model["image"], text


def _check_image_encoder(encoder: ImageEncoder, name: str) -> None:
    if not encoder.has_feature_map:
        raise ConfigError(
            f"model.image.name={name!r}: timm gives no spatial feature map for it (forward_intermediates), "
            "which MMBT pools into image tokens; choose a CNN or ViT such as resnet18, resnet50 or vit_tiny_patch16_224"
        )


def _check_transformer(encoder: TransformerTextEncoder, num_image_tokens: int) -> int:
    """The transformer's number of positions, after checking that it has an image segment and
    positions for [CLS], the image tokens and [SEP]."""
    config = encoder.model.config
    segments = getattr(config, "type_vocab_size", 0)
    if segments < 2:
        raise ConfigError(
            f"MMBT gives image and text tokens different segment (token type) embeddings, but the transformer "
            f"{config.model_type} has {segments}; use a BERT-like model with type_vocab_size >= 2"
        )
    positions = config.max_position_embeddings
    if num_image_tokens + 2 > positions:
        raise ConfigError(
            f"method.num_image_tokens={num_image_tokens} plus [CLS] and [SEP] need {num_image_tokens + 2} positions, "
            f"but the transformer has max_position_embeddings={positions}; use fewer image tokens or raise "
            "model.text.max_position_embeddings"
        )
    return positions


def _check_batch(batch: Batch) -> None:
    missing = [name for name in ("image", "input_ids", "attention_mask") if name not in batch]
    if missing:
        raise ConfigError(
            f"MMBT needs batch {missing} as well, but the stream gives {sorted(batch)}; use a single-view "
            "transform (method.view resize or assignment) and data with a tokenizer"
        )
