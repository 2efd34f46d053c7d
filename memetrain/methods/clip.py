"""CLIP: contrastive image-text pretraining (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", ICML 2021).

Each meme is an (image, caption) pair: an image tower and a text tower are projected to a shared
``embed_dim``, L2-normalised, and trained with a symmetric InfoNCE loss at a learned temperature
(:class:`memetrain.losses.contrastive.ClipLoss`; all-gather with gradients across ranks, local-loss
formulation). Labels are never used. Two kinds of towers:

- ``tower: memetrain``: ``model.image`` (a timm backbone) and ``model.text`` (our transformer or LSTM),
  each with a bias-free linear projection, as in the paper's sec. 2.5 (``model=clip_small``);
- ``tower: open_clip``: an open_clip architecture (``open_clip_model``, e.g. ``ViT-B-16``) with the
  weights ``open_clip_weights`` names, strictly (``model=clip_open_clip``): an open_clip pretrained tag
  (``openai``, ``laion2b_s34b_b88k`` ...) read through open_clip's hub code and the Hugging Face cache,
  or a local file (OpenAI's TorchScript ``.pt`` included). Captions are tokenised here from
  ``batch["text"]`` with open_clip's bundled BPE tokenizer, since the stream's is our WordPiece.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses.contrastive import ClipLoss, SoftTargetClipLoss
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method, valid_rows
from memetrain.methods.clip_recipe import projection as build_projection
from memetrain.methods.clip_recipe import tower_groups
from memetrain.methods.registry import DataInfo, register
from memetrain.models import ImageNormalizer, build_image_encoder, build_text_encoder, open_clip_weights
from memetrain.models.hub import Pretrained, remember

TOWERS = ("memetrain", "open_clip")
EMBEDS = ("both", "align", "image", "text")
LOSSES = ("infonce", "soft_targets")


class MemetrainTowers(nn.Module):
    """``model.image`` and ``model.text`` encoders, each with a bias-free linear projection to ``embed_dim``."""

    def __init__(self, image: dict[str, Any], text: dict[str, Any], embed_dim: int, init_logit_scale: float):
        super().__init__()
        self.image_encoder = build_image_encoder(**image)
        self.text_encoder = build_text_encoder(**text)
        self.image_projection = nn.Linear(self.image_encoder.out_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text_encoder.out_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))  # [], learned as a log

    def encode_image(self, batch: Batch) -> Tensor:
        return self.image_projection(self.image_encoder(batch["image"]))  # [B, embed_dim]

    def encode_text(self, batch: Batch) -> Tensor:
        if "input_ids" not in batch:
            raise ConfigError("CLIP's text tower needs batch['input_ids']; give the data a tokenizer")
        features = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        return self.text_projection(features)  # [B, embed_dim]


class OpenClipTowers(nn.Module):
    """An open_clip CLIP (``self.clip``, open_clip's module names) fed uint8 images and raw captions.

    ``image_size`` resizes the vision tower (positional embeddings of loaded weights are
    interpolated); ``None`` keeps the architecture's own. ``weights`` is null (random init), one of
    open_clip's pretrained tags of ``name`` (``openai``, ``laion2b_s34b_b88k`` ...: the file comes through
    open_clip's hub code and cache) or a local file (a state dict, or OpenAI's TorchScript ``.pt``,
    converted without running it); see :mod:`memetrain.models.open_clip_weights`. Loading is strict.
    The normalisation comes from the weights' preprocess config (the tag's, else the architecture's).
    """

    def __init__(self, name: str, weights: str | None, image_size: int | None, init_logit_scale: float):
        super().__init__()
        import open_clip  # here, not at the top: it takes seconds to import and only this tower needs it

        source = open_clip_weights.resolve(name, weights)
        self.clip, files = open_clip_weights.create(name, source, image_size, init_logit_scale)
        preprocess = self.clip.visual.preprocess_cfg  # the tag's, over the architecture's defaults
        size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]  # trained at, before image_size
        self.data_config = {  # as ImageEncoder.data_config: what the weights expect of an image
            "input_size": (3, *((size, size) if isinstance(size, int) else size)),
            "interpolation": preprocess["interpolation"],
            "mean": tuple(preprocess["mean"]),
            "std": tuple(preprocess["std"]),
            "resize_mode": preprocess["resize_mode"],
        }
        self.normalize = ImageNormalizer(self.data_config["mean"], self.data_config["std"])
        self.tokenizer = open_clip.get_tokenizer(name)  # the bundled BPE vocabulary (checked above)
        if files:
            kind = "file" if source.local else "open_clip"
            remember(self, Pretrained(kind, name, source.tag, tuple(files)))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, batch: Batch) -> Tensor:
        dtype = next(self.clip.visual.parameters()).dtype
        return self.clip.encode_image(self.normalize(batch["image"], dtype))  # [B, embed_dim]

    def encode_text(self, batch: Batch) -> Tensor:
        tokens = self.tokenizer(batch["text"]).to(self.logit_scale.device)  # [B, context_length]
        return self.clip.encode_text(tokens)  # [B, embed_dim]


@register
class Clip(Method):
    """CLIP pretraining. Options (``configs/method/clip.yaml`` says how to tune them): ``embed_dim``
    (memetrain towers), ``init_logit_scale`` and ``max_logit_scale`` (1 / temperature at the start
    and its upper clamp), ``local_loss``, ``tower`` and its ``open_clip_*`` settings, and ``embed``:
    what the probes get (see :meth:`embed`).

    The CASS study's CLIP row is a "simple CLIP" (moein-shariatnia/OpenAI-CLIP), options here:
    ``loss: soft_targets`` (:class:`memetrain.losses.contrastive.SoftTargetClipLoss`, at the fixed
    ``temperature``; the log scale is then not trained, and the loss reads the embeddings as the
    heads give them, unnormalised), ``projection: residual`` (its projection head,
    :class:`memetrain.methods.clip_recipe.ResidualProjection`, dropout ``projection_dropout``) and
    ``lr_scales`` (its learning rate per tower, times ``trainer.lr``; the heads decay by
    ``trainer.weight_decay``, the encoders by ``encoder_weight_decay``). Defaults: open_clip's
    InfoNCE, CLIP's linear projections, one learning rate."""

    name = "clip"

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        embed_dim: int = 256,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        local_loss: bool = True,
        tower: str = "memetrain",
        open_clip_model: str | None = None,
        open_clip_weights: str | None = None,
        open_clip_image_size: int | None = None,
        embed: str = "both",
        loss: str = "infonce",
        temperature: float = 1.0,
        projection: str = "linear",
        projection_dropout: float = 0.1,
        lr_scales: dict[str, float] | None = None,
        encoder_weight_decay: float = 0.0,
    ):
        super().__init__()
        if embed not in EMBEDS:
            raise ConfigError(f"method.embed={embed!r}: choose one of {', '.join(EMBEDS)}")
        if loss not in LOSSES:
            raise ConfigError(f"method.loss={loss!r}: choose one of {', '.join(LOSSES)}")
        if temperature <= 0:
            raise ConfigError(
                f"method.temperature={temperature}: give a positive number (the simple CLIP's 1.0)"
            )
        if not 1.0 <= init_logit_scale <= max_logit_scale:
            raise ConfigError(
                f"method.init_logit_scale={init_logit_scale} must be in [1, max_logit_scale={max_logit_scale}]"
            )
        self.embed_kind = embed
        self.max_log_scale = math.log(max_logit_scale)
        self.loss = ClipLoss(local_loss)
        if tower == "memetrain":
            if open_clip_model is not None or open_clip_weights is not None:
                raise ConfigError("method.open_clip_model and open_clip_weights need method.tower=open_clip")
            image, text = _memetrain_model(data.complete(model))
            self.model = MemetrainTowers(image, text, embed_dim, init_logit_scale)
            self.embed_dim = embed_dim
            if projection != "linear":  # the study's simple CLIP heads in place of the linear ones
                for side in ("image", "text"):
                    encoder = getattr(self.model, f"{side}_encoder")
                    head = build_projection(projection, encoder.out_dim, embed_dim, projection_dropout)
                    setattr(self.model, f"{side}_projection", head)
        elif tower == "open_clip":
            if any(model.get(part) is not None for part in ("image", "text", "head")):
                raise ConfigError(
                    "method.tower=open_clip builds both towers from method.open_clip_model, so the model "
                    f"config must not set image, text or head (it sets {sorted(k for k, v in model.items() if v)}); "
                    "use model=clip_open_clip"
                )
            if open_clip_model is None:
                raise ConfigError(
                    "method.tower=open_clip needs method.open_clip_model, e.g. ViT-B-32-quickgelu"
                )
            self.model = OpenClipTowers(
                open_clip_model, open_clip_weights, open_clip_image_size, init_logit_scale
            )
            self.embed_dim = self.model.clip.visual.output_dim
        else:
            raise ConfigError(f"method.tower={tower!r}: choose one of {', '.join(TOWERS)}")
        if tower != "memetrain" and (projection != "linear" or lr_scales is not None):
            raise ConfigError(
                "method.projection and method.lr_scales apply to method.tower=memetrain (open_clip models keep "
                "their own projections): leave them at linear and null"
            )
        self.loss_kind, self.lr_scales = loss, lr_scales
        self.encoder_weight_decay = encoder_weight_decay
        if loss == "soft_targets":
            self.soft_loss = SoftTargetClipLoss(temperature)
            self.model.logit_scale.requires_grad_(False)  # fixed temperature: no learned scale

    def logit_scale(self) -> Tensor:
        """The inverse temperature ``[]``, in ``[1, max_logit_scale]``."""
        return self.model.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def encode_image(self, batch: Batch) -> Tensor:
        if "image" not in batch:
            raise ConfigError(
                f"CLIP needs batch['image'] (one view per meme), the stream gives {sorted(batch)}; "
                "use the resize or assignment view"
            )
        return F.normalize(self.model.encode_image(batch), dim=-1)  # [B, D]

    def encode_text(self, batch: Batch) -> Tensor:
        return F.normalize(self.model.encode_text(batch), dim=-1)  # [B, D]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """With ``lr_scales``: the simple CLIP's groups (image encoder, text encoder, heads), each at
        its own learning rate; else the engine's decay groups."""
        if self.lr_scales is None:
            return super().param_groups(weight_decay)
        return tower_groups(self.model, self.lr_scales, weight_decay, self.encoder_weight_decay)

    def _soft_target_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if "image" not in batch:
            self.encode_image(batch)  # its error: CLIP needs one view per meme
        image, text = self.model.encode_image(batch), self.model.encode_text(batch)  # [B, D], unnormalised
        terms = self.soft_loss(image, text, valid_rows(batch))
        report = {"i2t_top1": terms["i2t_top1"], "t2i_top1": terms["t2i_top1"]}
        report["logit_scale"] = image.new_tensor(1 / self.soft_loss.temperature)
        report["embedding_std_image"] = embedding_std(F.normalize(image.detach(), dim=-1))
        report["embedding_std_text"] = embedding_std(F.normalize(text.detach(), dim=-1))
        return {"contrastive_loss": terms["contrastive_loss"]}, report

    def _step(self, batch: Batch, gather: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.loss_kind == "soft_targets":
            return self._soft_target_step(batch)
        image, text = self.encode_image(batch), self.encode_text(batch)  # [B, D] each
        scale = self.logit_scale()
        terms = self.loss(image, text, scale, gather=gather, valid=valid_rows(batch))
        losses = {name: value for name, value in terms.items() if name.endswith("_loss")}
        report = {name: value for name, value in terms.items() if name not in losses}
        report["logit_scale"] = scale.detach()
        report["embedding_std_image"] = embedding_std(image)
        report["embedding_std_text"] = embedding_std(text)
        return losses, report

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self._step(batch, gather=True)

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, Tensor]:
        """Loss and in-batch retrieval (``i2t_top1``: chance is 1 / batch) on this rank's memes,
        padding dropped (a repeated meme would be its own negative)."""
        valid = batch["valid"]
        keep = valid if valid.any() else torch.ones_like(valid)  # padding only: scored, then weighted 0
        losses, report = self._step(_rows(batch, keep), gather=False)
        return {**losses, **report}

    def embed(self, batch: Batch) -> Tensor:
        """L2-normalised embeddings: ``both`` concatenates image and text, ``[B, 2D]``; ``align`` is
        their element-wise product, ``[B, D]`` (Hate-CLIPper's align fusion: a linear probe on it can
        weigh how well each shared dimension agrees, which a meme's label needs and a probe on ``both``
        cannot express); ``image`` or ``text`` alone, ``[B, D]``."""
        if self.embed_kind == "align":
            return self.encode_image(batch) * self.encode_text(batch)
        parts = []
        if self.embed_kind in ("both", "image"):
            parts.append(self.encode_image(batch))
        if self.embed_kind in ("both", "text"):
            parts.append(self.encode_text(batch))
        return torch.cat(parts, dim=1)

    def embed_prompts(self, texts: Batch) -> Tensor:
        """L2-normalised text-tower embeddings ``[T, D]`` of arbitrary texts (zero-shot prompts),
        in the space of :meth:`encode_image`. ``texts`` is a batch as the stream carries text:
        ``text`` (the strings; the open_clip tower tokenises them itself) and, for the memetrain
        towers, ``input_ids`` and ``attention_mask`` from the run's tokenizer."""
        return self.encode_text(texts)

    def zero_shot_embed(self, batch: Batch, kind: str) -> Tensor:
        """What zero-shot prompts are compared with, ``[B, D]``: ``image`` (the image tower alone,
        as CLIP's zero-shot classifier) or ``image_text`` (the normalised sum of the meme's image
        and caption embeddings: a meme is both)."""
        image = self.encode_image(batch)
        if kind == "image":
            return image
        return F.normalize(image + self.encode_text(batch), dim=-1)

    def after_step(self, step: int, total_steps: int) -> None:
        """Keep the learned log scale in ``[0, log max_logit_scale]`` (the paper's clip at 100), so it
        can still move both ways (a clamp in the forward alone would leave it stuck past the bound)."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.max_log_scale)

    def edited_after_step(self) -> list[nn.Parameter]:
        if not self.model.logit_scale.requires_grad:  # a fixed temperature: not the optimizer's
            return []
        return [self.model.logit_scale]  # the clamp must reach an optimizer's master copy of it


def _memetrain_model(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if model.get("head") is not None:
        raise ConfigError(
            "CLIP trains its own projections, not a classifier head, but the model config sets "
            f"head={model['head']}; use model=clip_small (or a model config with image and text, no head)"
        )
    if model.get("image") is None or model.get("text") is None:
        raise ConfigError("CLIP needs both model.image and model.text; use model=clip_small")
    return model["image"], model["text"]


def _rows(batch: Batch, keep: Tensor) -> Batch:
    """What CLIP reads of ``batch``, for the memes where ``keep`` is True."""
    rows = {"text": [text for text, kept in zip(batch["text"], keep.tolist()) if kept]}
    for name in ("image", "input_ids", "attention_mask"):
        if name in batch:
            rows[name] = batch[name][keep]
    return rows
