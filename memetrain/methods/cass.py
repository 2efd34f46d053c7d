"""CASS: Cross-Architecture Self-Supervision (Singh, Gorantla et al., "CASS: Cross Architectural
Self-Supervision for Medical Image Analysis", 2022, arXiv:2206.04170).

A CNN (ResNet-50 in the paper; ``model=cass_small`` uses ResNet-18) and a ViT (ViT-B/16 at 384 px;
ViT-Tiny/16 here) see the SAME augmented view of a meme. Each backbone has its own projection head,
and the loss is ``2 - 2 cos`` between the two L2-normalised projections (symmetric, see
:mod:`memetrain.losses.agreement`). Both networks are trained: no stop-gradient, no EMA teacher.
Ours, not the paper's: ``variance_weight`` times VICReg's variance hinge on each normalised
projection (``variance_loss``, :func:`memetrain.losses.agreement.variance_hinge`), since from
scratch (the paper starts from ImageNet weights) the two networks drift to one constant output;
``variance_weight=0`` is the paper's loss.
What the two networks compare is ``compare``: ``projection`` (ours: a projection head per backbone,
to ``proj_dim``) or ``classifier``, as the public notebook does (pranavsinghps1/CASS CASS.ipynb
338-339, 360-364: ``timm.create_model(..., pretrained=True)`` keeps the 1000-class ImageNet
classifier, and the loss compares those logits; both classifiers train). Where the notebook differs
we do not follow it: it never zeroes gradients (the engine does), and it validates a different
network than the one it reports (``embed_from`` says which one ``embed`` returns).

    python launcher/train.py method=cass model=cass_small eval=probe data.label_fraction=0.05
    python launcher/train.py method=cass model=cass_base data=hateful_memes data.image_size=384 eval=probe

Fine-tuning one backbone afterwards: ``method=supervised model=resnet50
method.init.image="{path: <run>/checkpoints/<step>/model.safetensors, prefix: encoders.cnn.}"``
(``encoders.vit.`` for the ViT).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses.agreement import cosine_agreement_loss, mean_variance_hinge
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method, valid_rows
from memetrain.methods.registry import DataInfo, register
from memetrain.models import ImageEncoder, build_image_encoder


class ProjectionHead(nn.Sequential):
    """BYOL's projector (Grill et al. 2020, sec. 3.3): Linear -> BatchNorm -> ReLU -> Linear,
    ``[B, in_dim]`` to ``[B, out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


def configured(model: dict[str, Any], method: str, required: set[str], optional: set[str]) -> set[str]:
    """The branches ``model`` configures (keys with a value), refusing any that ``method`` does not use
    (a classifier's ``head``, a text encoder for image-only CASS ...) and any it needs but lacks."""
    present = {key for key, value in model.items() if value is not None}
    unused, missing = present - required - optional, required - present
    if unused or missing:
        problems = [f"model.{key} is not used by {method}" for key in sorted(unused)]
        problems += [f"{method} needs model.{key}" for key in sorted(missing)]
        raise ConfigError(f"{'; '.join(problems)}; use a model config made for it, e.g. model={method}_small")
    return present


def image_encoder(options: dict[str, Any], branch: str) -> ImageEncoder:
    """The image encoder of ``model.<branch>``; a ``vit`` branch must be a transformer, a ``cnn`` branch not."""
    encoder = build_image_encoder(**options)
    transformer = hasattr(encoder.model, "patch_embed")  # timm's ViT, DeiT, Swin ... embed patches
    if transformer != (branch == "vit"):
        kind = "a vision transformer" if branch == "vit" else "a convolutional network"
        raise ConfigError(f"model.{branch}.name={options['name']!r} must be {kind} (cross-architecture)")
    return encoder


def single_view(batch: Batch) -> Tensor:
    """``batch["image"]``: every branch sees the same view (uint8 ``[B, 3, H, W]``)."""
    if "image" not in batch:
        raise ConfigError(
            f"CASS needs one view per meme (batch['image']), but the stream gives {sorted(batch)}; "
            "use method.view.name=assignment or resize"
        )
    return batch["image"]


def concat_features(features: list[Tensor]) -> Tensor:
    """One feature ``[B, D]``; several are L2-normalised first, so that none dominates by its scale."""
    if len(features) == 1:
        return features[0]
    return torch.cat([F.normalize(f.float(), dim=1) for f in features], dim=1)


@register
class Cass(Method):
    """``model``: ``{cnn: <image encoder options>, vit: <image encoder options>}`` (``configs/model/cass_*.yaml``).

    ``embed_from`` picks the features ``embed`` returns (backbone features, before the projection
    head or classifier): ``cnn``, ``vit``, or ``both`` (each L2-normalised, then concatenated, CNN first).
    ``compare``: ``projection`` or ``classifier`` (the backbones' own classifiers, which must have as
    many classes; ``proj_dim`` and ``proj_hidden_dim`` are then not used).
    """

    name = "cass"
    needs_labels = False
    sync_batchnorm = True  # BYOL's projector normalises over the whole batch
    EMBED_FROM = {"cnn": ("cnn",), "vit": ("vit",), "both": ("cnn", "vit")}
    COMPARE = ("projection", "classifier")

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        proj_dim: int = 128,
        proj_hidden_dim: int = 512,
        variance_weight: float = 1.0,
        embed_from: str = "cnn",
        compare: str = "projection",
    ):
        super().__init__()
        configured(model, self.name, required={"cnn", "vit"}, optional=set())
        if variance_weight < 0:
            raise ConfigError(
                f"method.variance_weight={variance_weight}: give a weight >= 0 (0: no variance term)"
            )
        self.variance_weight = variance_weight
        if embed_from not in self.EMBED_FROM:
            raise ConfigError(f"method.embed_from={embed_from!r}: choose one of {', '.join(self.EMBED_FROM)}")
        self.embed_from = embed_from
        if compare not in self.COMPARE:
            raise ConfigError(f"method.compare={compare!r}: choose one of {', '.join(self.COMPARE)}")
        self.compare = compare
        keep = {"keep_classifier": True} if compare == "classifier" else {}
        self.encoders = nn.ModuleDict({b: image_encoder({**model[b], **keep}, b) for b in ("cnn", "vit")})
        if compare == "classifier":
            classes = {b: e.model.num_classes for b, e in self.encoders.items()}
            if classes["cnn"] != classes["vit"]:
                raise ConfigError(
                    f"method.compare=classifier: the classifiers have {classes['cnn']} (model.cnn) and "
                    f"{classes['vit']} (model.vit) classes; give both networks weights of the same classes"
                )
            self.heads = None
        else:
            self.heads = nn.ModuleDict(
                {b: ProjectionHead(e.out_dim, proj_hidden_dim, proj_dim) for b, e in self.encoders.items()}
            )

    def compared(self, images: Tensor) -> dict[str, Tensor]:
        """What each network puts forward for the comparison: ``{"cnn": [B, D], "vit": [B, D]}``."""
        if self.heads is None:
            return {b: self.encoders[b].logits(images) for b in ("cnn", "vit")}
        return {b: self.heads[b](self.encoders[b](images)) for b in ("cnn", "vit")}

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        images = single_view(batch)  # the same view for both networks
        z = self.compared(images)
        report = {f"embedding_std_{b}": embedding_std(z[b]) for b in z}
        valid = valid_rows(batch)  # rows that are not valid count in neither term
        losses = {"agreement_loss": cosine_agreement_loss(z["cnn"], z["vit"], valid)}
        if self.variance_weight > 0:
            losses["variance_loss"] = self.variance_weight * mean_variance_hinge([z["cnn"], z["vit"]], valid)
        return losses, report

    def embed(self, batch: Batch) -> Tensor:
        images = single_view(batch)
        return concat_features([self.encoders[b](images) for b in self.EMBED_FROM[self.embed_from]])
