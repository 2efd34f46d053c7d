"""CASS-MM: Cross-Architecture Self-Supervision across modalities, for memes.

The CASS study for memes names this multimodal variant of CASS (Singh, Gorantla et al., "CASS:
Cross Architectural Self-Supervision for Medical Image Analysis", 2022, arXiv:2206.04170) without
defining it; this is our exact definition. The image and the text of the same meme play the roles
of CASS's two architectures.

Branches: one or two image encoders (``model.cnn``, ``model.vit``: a ResNet-50 or a ViT-B/16 in
the study, both for the optional unimodal term) and a text encoder (``model.text``, a transformer).
All branches see the same meme: the same augmented image view (``batch["image"]``) and its text.
Each branch ``b`` has its own projection head ``g_b`` (BYOL's projector) into one shared space of
width ``proj_dim``: ``z_b = g_b(f_b(x))``. With ``l(a, b) = 2 - 2 cos(a, b)`` averaged over the batch
(:func:`memetrain.losses.agreement.cosine_agreement_loss`) and lambda = ``unimodal_weight``:

    L = mean over image branches b of l(z_b, z_text)  +  lambda * l(z_cnn, z_vit)
        + mu * mean over all branches b of v(z_b)

The first term (``cross_modal_loss``) is CASS between each image branch and the text branch,
averaged over the image branches (one or two); the second (``unimodal_loss``) is image-only CASS
between the CNN and the ViT, present only when both are configured (lambda > 0 with a single image
branch is refused). ``l`` is symmetric and nothing is detached: every encoder and every projection
head receives gradients from every term it appears in (no stop-gradient, no EMA). The third term
(``variance_loss``, mu = ``variance_weight``) is ours, not the study's: ``v`` is VICReg's variance
hinge on the normalised projections (:func:`memetrain.losses.agreement.variance_hinge`); without
it the image and text branches trained from scratch agree on one constant output within tens of
steps. mu = 0 is the pure agreement loss.

``embed`` returns backbone features (before the projection heads) per ``embed_from``: ``image``
(the image branches, CNN first), ``text``, or ``both`` (image branches, then text); several
features are L2-normalised each and concatenated.

    python launcher/train.py method=cass_mm model=cass_mm_small eval=probe data.label_fraction=0.05
    python launcher/train.py method=cass_mm model=cass_mm_small model/image@model.cnn=resnet18 method.unimodal_weight=0.5
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses.agreement import CassMMLoss
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method, valid_rows
from memetrain.methods.cass import ProjectionHead, concat_features, configured, image_encoder, single_view
from memetrain.methods.registry import DataInfo, register
from memetrain.models import build_text_encoder


@register
class CassMM(Method):
    """``model``: ``{cnn: ..., vit: ..., text: ...}``, one or both image branches (``configs/model/cass_mm_*.yaml``)."""

    name = "cass_mm"
    needs_labels = False
    sync_batchnorm = True  # BYOL's projector normalises over the whole batch
    EMBED_FROM = ("image", "text", "both")

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        proj_dim: int = 128,
        proj_hidden_dim: int = 512,
        unimodal_weight: float = 0.0,
        variance_weight: float = 1.0,
        embed_from: str = "both",
    ):
        super().__init__()
        present = configured(model, self.name, required={"text"}, optional={"cnn", "vit"})
        self.image_branches = [b for b in ("cnn", "vit") if b in present]
        if not self.image_branches:
            raise ConfigError("cass_mm needs an image branch: configure model.cnn, model.vit or both")
        if unimodal_weight < 0 or (unimodal_weight > 0 and len(self.image_branches) < 2):
            raise ConfigError(
                f"method.unimodal_weight={unimodal_weight} weights the CNN-ViT term: it must be >= 0, and "
                "> 0 only with both model.cnn and model.vit (e.g. model/image@model.cnn=resnet18)"
            )
        if variance_weight < 0:
            raise ConfigError(
                f"method.variance_weight={variance_weight}: give a weight >= 0 (0: no variance term)"
            )
        if embed_from not in self.EMBED_FROM:
            raise ConfigError(f"method.embed_from={embed_from!r}: choose one of {', '.join(self.EMBED_FROM)}")
        self.embed_from = embed_from
        model = data.complete(model)
        encoders: dict[str, nn.Module] = {b: image_encoder(model[b], b) for b in self.image_branches}
        encoders["text"] = build_text_encoder(**model["text"])
        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict(
            {b: ProjectionHead(e.out_dim, proj_hidden_dim, proj_dim) for b, e in self.encoders.items()}
        )
        self.loss = CassMMLoss(unimodal_weight, variance_weight)

    def _text_features(self, batch: Batch) -> Tensor:
        if "input_ids" not in batch:
            raise ConfigError("cass_mm's text branch needs batch['input_ids']; give the data a tokenizer")
        return self.encoders["text"](batch["input_ids"], batch["attention_mask"])  # [B, text dim]

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        images = single_view(batch)  # the same view for every image branch
        z = {b: self.heads[b](self.encoders[b](images)) for b in self.image_branches}  # each [B, proj_dim]
        z["text"] = self.heads["text"](self._text_features(batch))  # [B, proj_dim]
        losses = self.loss([z[b] for b in self.image_branches], z["text"], valid_rows(batch))
        return losses, {f"embedding_std_{b}": embedding_std(z[b]) for b in z}

    def embed(self, batch: Batch) -> Tensor:
        features = []
        if self.embed_from in ("image", "both"):
            features += [self.encoders[b](single_view(batch)) for b in self.image_branches]
        if self.embed_from in ("text", "both"):
            features.append(self._text_features(batch))
        return concat_features(features)
