"""Image backbones from timm, fed uint8 images that are normalised on the device."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.models.hub import Pretrained, remember
from memetrain.models.timm_weights import TimmWeights, close_names, resolve
from memetrain.models.weights import describe_mismatch, reading_weights

log = logging.getLogger(__name__)

__all__ = ["ImageEncoder", "ImageNormalizer", "build_backbone", "close_names", "create_backbone"]


class ImageNormalizer(nn.Module):
    """uint8 ``[B, 3, H, W]`` in ``[0, 255]`` to ``(x / 255 - mean) / std`` in the requested dtype.

    Batches stay uint8 through the loader (4x less host memory and transfer than float32) and are
    normalised here, on the device. ``mean`` and ``std`` are non-persistent buffers: they follow
    ``.to(device)`` but come from the weights' pretrained config (``ImageEncoder.data_config``,
    open_clip's ``preprocess_cfg``), not from checkpoints. ``memory_format`` is
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

    ``name`` is any timm model name, optionally with a pretrained tag (``vit_base_patch16_224.dino``).
    ``pretrained`` names the weights (:mod:`memetrain.models.timm_weights`): ``true`` for timm's default
    tag, a tag or full timm name, ``hf-hub:<repo>``, or a local file; hub weights come through timm's
    hub code and the Hugging Face cache (``HF_HUB_OFFLINE=1`` reads only the cache). The weights' own
    pretrained config is the one source of ``data_config`` (timm's ``resolve_model_data_config``:
    ``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct``), and so of the normalisation;
    without weights, the name's tag (or timm's default tag) gives it. ``image_size`` is passed to models
    with a fixed input size (ViT, Swin; loaded position embeddings are resampled); convolutional nets
    take any size. ``freeze`` stops gradients and keeps the backbone in eval mode (batch-norm
    statistics fixed), as a linear probe needs. ``keep_classifier`` keeps timm's classifier (the
    weights' own, e.g. ImageNet's 1000 classes) for :meth:`logits`; ``forward`` still returns the
    features before it. Without it the classifier is dropped, and :meth:`dropped_names` says which
    names of a checkpoint that has one this encoder does not load.
    """

    def __init__(
        self,
        name: str,
        image_size: int | None = None,
        pretrained: bool | str | None = None,
        grad_checkpointing: bool = False,
        freeze: bool = False,
        keep_classifier: bool = False,
    ):
        super().__init__()
        weights = resolve(name, pretrained)
        self.model, files = build_backbone(weights, image_size, keep_classifier)
        self.keep_classifier = keep_classifier
        self.data_config: dict[str, Any] = timm.data.resolve_model_data_config(self.model)
        self.normalize = ImageNormalizer(self.data_config["mean"], self.data_config["std"])
        if files:
            source = "file" if weights.local else "timm"
            remember(self, Pretrained(source, weights.arch, weights.tag, tuple(files)))
            _log_weights(weights, files[-1], self.data_config, image_size)
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
        if self.keep_classifier:
            features = self.model.forward_features(self.normalize(images, dtype))
            return self.model.forward_head(features, pre_logits=True)  # [B, out_dim]
        return self.model(self.normalize(images, dtype))  # [B, out_dim]

    def logits(self, images: Tensor) -> Tensor:
        """The kept classifier's outputs, ``[B, num_classes]`` (``keep_classifier=True``)."""
        if not self.keep_classifier:
            raise RuntimeError("this ImageEncoder dropped its classifier: build it with keep_classifier=True")
        dtype = next(self.model.parameters()).dtype
        return self.model(self.normalize(images, dtype))

    @property
    def dropped_names(self) -> tuple[str, ...]:
        """Prefixes of the state-dict names of the classifier this encoder dropped (``model.fc.``),
        which a checkpoint of an encoder that kept it holds: :func:`load_weights` skips them."""
        if self.keep_classifier:
            return ()
        classifier = self.model.pretrained_cfg.get("classifier") or ()
        return tuple(
            f"model.{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier)
        )

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


def create_backbone(name: str, image_size: int | None, pretrained: bool | str | None) -> nn.Module:
    """``timm.create_model`` with no classifier, its weights as ``pretrained`` names them (see
    :mod:`memetrain.models.timm_weights`), loaded strictly."""
    return build_backbone(resolve(name, pretrained), image_size)[0]


def build_backbone(
    weights: TimmWeights, image_size: int | None, keep_classifier: bool = False
) -> tuple[nn.Module, list[Path]]:
    """The backbone of ``weights`` and the files its weights were read from (none: random init,
    or models built for their structure only, :func:`memetrain.models.weights.structure_only`);
    with ``keep_classifier``, with the weights' classifier (their ``num_classes``, timm's 1000 by default)."""
    reading = reading_weights()
    if weights.from_hub_repo:
        weights.resolve_hub_config(download=True)  # its config.json: architecture and statistics
    kwargs = {}
    if image_size is not None and weights.cfg.get("fixed_input_size"):
        kwargs["img_size"] = image_size
    classes = weights.cfg.get("num_classes", 1000)
    if not weights.loads or not reading:
        num_classes = classes if keep_classifier else 0
        return timm.create_model(weights.build_name, pretrained=False, num_classes=num_classes, **kwargs), []
    files = weights.fetch()
    path = files[-1]
    if weights.local:
        # timm loads a pretrained_cfg "file" non-strictly (missing and unexpected names are only
        # logged) when num_classes differs from the checkpoint's. So the classifier is dropped here
        # and the state dict handed over in memory with num_classes=0: timm still adapts it
        # (position-embedding resampling for another image size, layout conversions) and loads it strictly.
        # Kept, the classifier loads strictly with the rest (num_classes is the file's).
        classifier = weights.cfg.get("classifier") or ()
        heads = () if keep_classifier else (classifier,) if isinstance(classifier, str) else tuple(classifier)
        num_classes = classes if keep_classifier else 0
        overlay = {"state_dict": _read_timm_weights(path, heads), "num_classes": num_classes}
    else:
        # Hub weights keep their classifier and load strictly into a model with the checkpoint's own
        # classes, after timm's conversions (which may create the classifier, as from open_clip
        # checkpoints); the classifier goes afterwards.
        overlay = {"state_dict": _read_timm_weights(path, ()), "source": ""}
        num_classes = classes
    try:
        model = timm.create_model(
            weights.build_name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=overlay,
            **kwargs,
        )
    except RuntimeError as err:
        raise ConfigError(
            f"weights file {path} ({weights.describe()}) does not fit timm model {weights.arch!r} "
            f"(image_size={image_size}): {_summarise_load_error(str(err))}; check the model name and that "
            "the file holds its weights"
        ) from None
    model.pretrained_cfg.pop("state_dict", None)  # a copy of the weights, not to be kept alive
    if num_classes and not keep_classifier:
        model.reset_classifier(0)
    return model, [path]


def _read_timm_weights(path: Path, heads: tuple[str, ...]) -> dict[str, Tensor]:
    """A timm-format state dict without the classifier ``heads`` (module names)."""
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} not found; check the path")
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


def _log_weights(weights: TimmWeights, path: Path, data: dict[str, Any], image_size: int | None) -> None:
    native = data["input_size"][-1]
    log.info(
        "%s: weights from %s; normalised with mean %s, std %s; trained at %d px with %s interpolation%s",
        weights.describe(),
        path,
        tuple(round(v, 4) for v in data["mean"]),
        tuple(round(v, 4) for v in data["std"]),
        native,
        data["interpolation"],
        f" (this run feeds {image_size} px)" if image_size and image_size != native else "",
    )
