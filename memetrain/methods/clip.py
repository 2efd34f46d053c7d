"""CLIP: contrastive image-text pretraining (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", ICML 2021).

Each meme is an (image, caption) pair: an image tower and a text tower are projected to a shared
``embed_dim``, L2-normalised, and trained with a symmetric InfoNCE loss at a learned temperature
(:class:`memetrain.losses.contrastive.ClipLoss`; all-gather with gradients across ranks, local-loss
formulation). Labels are never used. Two kinds of towers:

- ``tower: memetrain``: ``model.image`` (a timm backbone) and ``model.text`` (our transformer or LSTM),
  each with a bias-free linear projection, as in the paper's sec. 2.5 (``model=clip_small``);
- ``tower: open_clip``: an open_clip architecture (``open_clip_model``, e.g. ``ViT-B-32-quickgelu``)
  whose state dict is open_clip's, so real OpenAI or LAION checkpoints load from the local file
  ``open_clip_weights``, strictly (``model=clip_open_clip``). Captions are tokenised here from
  ``batch["text"]`` with open_clip's bundled BPE tokenizer, since the stream's is our WordPiece.
  Nothing is downloaded.
"""

from __future__ import annotations

import difflib
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses.contrastive import ClipLoss
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method
from memetrain.methods.registry import DataInfo, register
from memetrain.models import ImageNormalizer, build_image_encoder, build_text_encoder
from memetrain.models.weights import TORCH_SUFFIXES, describe_mismatch

log = logging.getLogger(__name__)

TOWERS = ("memetrain", "open_clip")
EMBEDS = ("both", "align", "image", "text")


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
    interpolated); ``None`` keeps the architecture's own. ``weights`` is a local state-dict file
    (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with ``weights_only=True``) that must fill
    every parameter. OpenAI's weights need the ``-quickgelu`` architectures: they load into the
    plain ones too, but compute something else.
    """

    def __init__(self, name: str, weights: str | None, image_size: int | None, init_logit_scale: float):
        super().__init__()
        import open_clip  # here, not at the top: it takes seconds to import and only this tower needs it

        _check_open_clip_model(open_clip, name)
        if weights is not None:
            _check_weights_file(Path(weights))
        logging.disable(logging.WARNING)  # create_model warns that it starts from random weights
        try:
            self.clip = open_clip.create_model(
                name, force_image_size=image_size, init_logit_scale=math.log(init_logit_scale)
            )
        finally:
            logging.disable(logging.NOTSET)
        if weights is not None:
            _load_open_clip_weights(open_clip, self.clip, name, Path(weights))
        preprocess = self.clip.visual.preprocess_cfg
        self.normalize = ImageNormalizer(preprocess["mean"], preprocess["std"])
        self.tokenizer = open_clip.get_tokenizer(name)  # the bundled BPE vocabulary (checked above)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, batch: Batch) -> Tensor:
        dtype = next(self.clip.visual.parameters()).dtype
        return self.clip.encode_image(self.normalize(batch["image"], dtype))  # [B, embed_dim]

    def encode_text(self, batch: Batch) -> Tensor:
        tokens = self.tokenizer(batch["text"]).to(self.logit_scale.device)  # [B, context_length]
        return self.clip.encode_text(tokens)  # [B, embed_dim]


def _check_open_clip_model(open_clip, name: str) -> None:
    """``name`` must be a built-in open_clip CLIP that needs nothing from a hub (its own tokenizer)."""
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=6, cutoff=0.5)
        raise ConfigError(
            f"method.open_clip_model={name!r} is not an open_clip architecture; close matches: "
            f"{', '.join(close) or 'none (see open_clip.list_models())'}"
        )
    config = open_clip.get_model_config(name)
    hub_text = {"hf_model_name", "hf_tokenizer_name"} & config["text_cfg"].keys()
    not_clip = {"multimodal_cfg", "init_logit_bias"} & config.keys()  # CoCa, SigLIP
    if hub_text or not_clip:
        raise ConfigError(
            f"open_clip model {name!r} is not a plain CLIP with open_clip's own tokenizer (it is a SigLIP or "
            "CoCa, or needs a Hugging Face text model); choose e.g. ViT-B-32-quickgelu or RN50-quickgelu "
            "(OpenAI weights), ViT-B-32 or ViT-B-16 (LAION weights)"
        )


def _check_weights_file(path: Path) -> None:
    """Before any model is built: the weights file exists and has a suffix we read safely."""
    if not path.is_file():
        raise ConfigError(f"method.open_clip_weights: {path} not found (weights are never downloaded)")
    if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ConfigError(
            f"method.open_clip_weights: {path} should be .safetensors or a torch state dict ({', '.join(TORCH_SUFFIXES)})"
        )


def _load_open_clip_weights(open_clip, model: nn.Module, name: str, path: Path) -> None:
    try:
        incompatible = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise ConfigError(
            f"open_clip weights {path} cannot be loaded into {name}: {' '.join(str(err).split())[:400]}. "
            "An OpenAI TorchScript .pt must first be saved as a state dict "
            "(torch.jit.load(path).state_dict() without input_resolution, context_length, vocab_size)"
        ) from None
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ConfigError(
            f"open_clip weights {path} do not fit {name}: "
            f"{describe_mismatch(incompatible.missing_keys, incompatible.unexpected_keys)}; "
            "check method.open_clip_model"
        )
    log.info("open_clip %s: weights from %s, logit scale %.1f", name, path, model.logit_scale.exp().item())


@register
class Clip(Method):
    """CLIP pretraining. Options (``configs/method/clip.yaml`` says how to tune them): ``embed_dim``
    (memetrain towers), ``init_logit_scale`` and ``max_logit_scale`` (1 / temperature at the start
    and its upper clamp), ``local_loss``, ``tower`` and its ``open_clip_*`` settings, and ``embed``:
    what the probes get (see :meth:`embed`)."""

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
    ):
        super().__init__()
        if embed not in EMBEDS:
            raise ConfigError(f"method.embed={embed!r}: choose one of {', '.join(EMBEDS)}")
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

    def _step(self, batch: Batch, gather: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        image, text = self.encode_image(batch), self.encode_text(batch)  # [B, D] each
        scale = self.logit_scale()
        terms = self.loss(image, text, scale, gather=gather)
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

    def after_step(self, step: int, total_steps: int) -> None:
        """Keep the learned log scale in ``[0, log max_logit_scale]`` (the paper's clip at 100), so it
        can still move both ways (a clamp in the forward alone would leave it stuck past the bound)."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, self.max_log_scale)


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
