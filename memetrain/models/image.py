"""Image backbones from timm, fed uint8 images that are normalised on the device."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.models.weights import describe_mismatch

SUGGESTIONS = 8


class ImageNormalizer(nn.Module):
    """uint8 ``[B, 3, H, W]`` in ``[0, 255]`` to ``(x / 255 - mean) / std`` in the requested dtype.

    Batches stay uint8 through the loader (4x less host memory and transfer than float32) and are
    normalised here, on the device. ``mean`` and ``std`` are non-persistent buffers: they follow
    ``.to(device)`` but come from the configuration, not from checkpoints. ``memory_format`` is
    the layout of the output (:func:`memetrain.models.memory.use_channels_last` changes it).
    """

    memory_format = torch.contiguous_format

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    def forward(self, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"ImageNormalizer expects uint8 images, got {images.dtype}")
        # The loader stacks batches channels-last (a cheap copy there); CPU training steps were
        # up to 3x slower on that layout in our runs, so reorder here, while the data is still uint8
        # (GPU runs with trainer.channels_last keep it).
        images = images.contiguous(memory_format=self.memory_format)
        # x / 255 / std - mean / std, computed in float32 then cast: [B, 3, H, W]
        return (images.float() * self.scale - self.shift).to(dtype)


class ImageEncoder(nn.Module):
    """A timm backbone without its classifier: uint8 ``[B, 3, H, W]`` to pooled features ``[B, out_dim]``.

    ``name`` is any timm model name, optionally with a pretrained tag (``vit_base_patch16_224.dino``),
    which selects the normalisation mean and std. ``image_size`` is passed to models with a fixed
    input size (ViT, Swin); convolutional nets take any size. ``pretrained`` is the path of a local
    timm-format weights file (``.safetensors`` preferred; ``.pth``/``.bin`` are read with
    ``weights_only=True``); nothing is downloaded. ``freeze`` stops gradients and keeps the backbone
    in eval mode (batch-norm statistics fixed), as a linear probe needs.
    """

    def __init__(
        self,
        name: str,
        image_size: int | None = None,
        pretrained: str | None = None,
        grad_checkpointing: bool = False,
        freeze: bool = False,
    ):
        super().__init__()
        self.model = create_backbone(name, image_size, pretrained)
        cfg = self.model.pretrained_cfg
        self.normalize = ImageNormalizer(cfg["mean"], cfg["std"])
        # models with a pre-logits MLP (VGG) return its output, wider than the trunk's channels
        self.out_dim: int = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self.frozen = freeze
        if grad_checkpointing:
            try:
                self.model.set_grad_checkpointing(True)
            except AssertionError:  # timm's "not supported" (VGG)
                raise ConfigError(
                    f"timm model {name!r} has no gradient checkpointing; set grad_checkpointing=false for it"
                ) from None
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(self.normalize(images, dtype))  # [B, out_dim]

    @property
    def has_feature_map(self) -> bool:
        """Whether timm can return this backbone's spatial features (:meth:`feature_map`)."""
        return hasattr(self.model, "forward_intermediates") and hasattr(self.model, "feature_info")

    @property
    def map_dim(self) -> int:
        """Channels of :meth:`feature_map` (VGG's are narrower than ``out_dim``, its pre-logits MLP's)."""
        return self.model.feature_info[-1]["num_chs"]

    def feature_map(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` to the last stage's features before global pooling, ``[B, map_dim, h, w]``.

        A CNN's final feature map; a ViT's patch tokens laid out on their grid (prefix tokens
        dropped, final norm applied). Layers after the last stage (VGG's pre-logits MLP) are not run.
        """
        dtype = next(self.model.parameters()).dtype
        (features,) = self.model.forward_intermediates(
            self.normalize(images, dtype), indices=1, norm=True, intermediates_only=True, output_fmt="NCHW"
        )
        return features  # [B, map_dim, h, w]


def create_backbone(name: str, image_size: int | None, pretrained: str | None) -> nn.Module:
    """``timm.create_model`` with no classifier, strict local weights and no hub access."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}; close matches: {', '.join(close_names(name))}")
    try:
        pretrained_cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:
        tags = timm.list_pretrained(name.split(".")[0] + ".*") or ["none"]
        raise ConfigError(
            f"timm model {name!r} has an unknown pretrained tag; known: {', '.join(tags)}"
        ) from None
    kwargs = {}
    if image_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    if pretrained is None:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    classifier = (pretrained_cfg.classifier if pretrained_cfg else None) or ()
    state = _read_timm_weights(Path(pretrained), (classifier,) if isinstance(classifier, str) else classifier)
    # timm loads a pretrained_cfg "file" non-strictly (missing and unexpected names are only logged)
    # when num_classes differs from the checkpoint's. So the classifier is dropped here and the
    # state dict handed over in memory with num_classes=0: timm still adapts it (position-embedding
    # resampling for another image size, layout conversions) and loads it strictly.
    overlay = {"state_dict": state, "num_classes": 0}
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
        )
    except RuntimeError as err:
        raise ConfigError(
            f"weights file {pretrained} does not fit timm model {name!r} (image_size={image_size}): "
            f"{_summarise_load_error(str(err))}; check the model name and that the file holds its weights"
        ) from None
    model.pretrained_cfg.pop("state_dict", None)  # a copy of the weights, not to be kept alive
    return model


def _read_timm_weights(path: Path, heads: tuple[str, ...]) -> dict[str, Tensor]:
    """A timm-format state dict without the classifier ``heads`` (module names)."""
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} not found (weights are never downloaded)")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except (RuntimeError, ValueError, EOFError) as err:
        raise ConfigError(f"weights file {path} cannot be read safely: {err}") from None
    return {key: value for key, value in state.items() if key.rsplit(".", 1)[0] not in heads}


def _summarise_load_error(message: str) -> str:
    """torch's strict-loading error (one line per problem, every name quoted) as counts and examples."""
    missing, unexpected, shapes = [], [], []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("Missing key(s)"):
            missing += re.findall(r'"([^"]+)"', line)
        elif line.startswith("Unexpected key(s)"):
            unexpected += re.findall(r'"([^"]+)"', line)
        elif line.startswith("size mismatch for"):
            shapes.append(line.removeprefix("size mismatch for ").split(":")[0])
    return describe_mismatch(missing, unexpected, shapes) or " ".join(message.split())


def close_names(name: str) -> list[str]:
    """timm model names that contain ``name`` or look like it."""
    everything = timm.list_models()
    stem = name.split(".")[0]
    found = timm.list_models(f"*{stem}*")[:SUGGESTIONS]
    found += difflib.get_close_matches(stem, everything, n=SUGGESTIONS, cutoff=0.6)
    return list(dict.fromkeys(found))[:SUGGESTIONS] or ["none (see timm.list_models())"]
