"""CMML-CLIP: Comprehensive Multi-Modal Learning (Yang, Wang, Zhan, Xiong, Jiang, "Comprehensive
Semi-Supervised Multi-Modal Learning", IJCAI 2019) over frozen CLIP features, the semi-supervised
baseline of the SemiMemes study.

Per modality m (image, text), an encoder turns the frozen CLIP feature into a hidden vector h_m
and a classifier gives probabilities p_m. An instance-level attention scores each h_m with one
shared MLP; the softmax over the two modalities, a_m, weighs how sufficient each modality is for
this meme, and a classifier reads the fused h = a_image h_image + a_text h_text:

    L = w_fused * BCE(fused) + BCE(p_image) + BCE(p_text)                   on labeled memes
      + w_div * mean cos(p_image, p_text)                                   on labeled memes
      + w_cons * mean Huber_delta(2 - cos(p_image, p_text))                 on unlabeled memes

(:mod:`memetrain.losses.consistency`). Labeled and unlabeled memes come in the same step: the
stage streams ``data.batch_size`` memes of the labeled fraction plus ``unlabeled_ratio`` times as
many from every training meme and ``data.unlabeled_splits`` with labels hidden
(:class:`memetrain.data.semi_supervised.SemiSupervisedStream`); a meme counts as unlabeled when
none of its targets is labeled. A row that is not valid (:func:`memetrain.methods.base.valid_rows`)
counts in no term. ``predict`` is the fused classifier.

The paper's text was not at hand; the structure and constants follow the CMML code of the
authors' group's OMML library (``torchmm/models/cmml.py``: fused loss weight 3, diversity weight
0.01, consistency weight 1, Huber threshold 1.003, attention MLP hidden -> hidden/2 -> 1).
Choices of ours, where that code does not apply or is not followed:

- the image and the text encoder are the same MLP shape (feature -> 2 hidden -> hidden, ReLU),
  over frozen CLIP features (OMML: a fine-tuned ResNet-34 plus one linear layer for images);
- each modality's hidden vector is weighted by its own attention score (OMML's code gives the
  image the text's score and vice versa, an index slip);
- prediction vectors are each target's two-class distribution, so that a single binary label has
  a defined cosine (see :mod:`memetrain.losses.consistency`);
- OMML's optional unimodal warm-up (``pretrain``) is left out.

The SemiMemes study ran CMML-CLIP with its own code (FPTU-Thesis-CSAI/SemiMemes ``src/CmmlTrain.py``,
``src/model/CmmlLayer.py``, ``scripts/cmml_clip_welltune_*.sh``); its choices are options here:
``encoder: linear`` (each modality's CLIP feature through one Linear to 256, no activation:
``ImgNet``/``TextfeatureNet`` with ``use_drop_out`` off), linear classifiers (``PredictNet`` without
``use_act``), the attention MLP ``attention_hidden: [64, 32]`` (``Attentionparameter`` 256, 64, 32, 1),
``prediction_vector: sigmoid`` (the cosines compare the K sigmoid outputs: ``loss.py`` 241-255),
``fused_weight: 2`` (``CmmlTrain.py`` 261), ``diversity_weight: 0`` (``use_div`` off) and a recipe of
Adam at lr 1e-4, weight decay 1e-4, StepLR every 200 steps by ``step_lr_gamma``.

    python launcher/train.py method=clip model=clip_small eval=probe
    python launcher/train.py method=cmml model=clip_small data.label_fraction=0.05 \\
        method.clip.weights=runs/synth/clip-clip_small-seed0/checkpoints/step_0000600/model.safetensors
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses.consistency import diversity_loss, robust_consistency_loss
from memetrain.losses.masking import masked_mean
from memetrain.methods.base import Batch, Method, Stage, valid_rows
from memetrain.methods.frozen_clip import frozen_clip
from memetrain.methods.objective import ClassificationObjective, accuracies
from memetrain.methods.registry import DataInfo, register

ENCODERS, PREDICTION_VECTORS = ("mlp", "linear"), ("two_class", "sigmoid")


class InstanceAttention(nn.Module):
    """Per-meme weights of M modalities from their hidden vectors, one MLP shared by all of them
    (hidden layers ``widths``, ReLU after each, then one score; default ``[hidden_dim // 2]``)."""

    def __init__(self, hidden_dim: int, widths: list[int] | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        width = hidden_dim
        for out in widths or [hidden_dim // 2]:
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        self.score = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden [B, M, H]`` -> (fused ``[B, H]``, weights ``[B, M]``, softmax over modalities)."""
        weights = self.score(hidden).squeeze(-1).softmax(dim=1)  # [B, M]
        return attention_fusion(hidden, weights), weights


def attention_fusion(hidden: Tensor, weights: Tensor) -> Tensor:
    """``sum_m weights[b, m] * hidden[b, m]``: ``[B, M, H]`` and ``[B, M]`` -> ``[B, H]``."""
    return torch.einsum("bm,bmh->bh", weights, hidden)


class Outputs(NamedTuple):
    """Logits of the fused and of each modality's classifier ``[B, targets]``, the fused hidden
    vector ``[B, H]`` and the attention weights ``[B, 2]`` (image, text)."""

    fused: Tensor
    image: Tensor
    text: Tensor
    hidden: Tensor
    attention: Tensor


@register
class CMML(Method):
    """CMML-CLIP. Options (``configs/method/cmml.yaml`` says how to tune them): ``clip`` (the frozen
    feature extractor), ``hidden_dim``, the loss weights ``fused_weight``, ``diversity_weight``,
    ``consistency_weight``, ``huber_delta``, ``unlabeled_ratio`` (μ), and ``targets``, ``loss``,
    ``focal_gamma`` as in ``supervised``."""

    name = "cmml"
    needs_labels = True

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        clip: dict[str, Any],
        hidden_dim: int = 256,
        fused_weight: float = 3.0,
        diversity_weight: float = 0.01,
        consistency_weight: float = 1.0,
        huber_delta: float = 1.003,
        unlabeled_ratio: float = 1.0,
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        encoder: str = "mlp",
        attention_hidden: list[int] | None = None,
        prediction_vector: str = "two_class",
    ):
        super().__init__()
        if encoder not in ENCODERS or prediction_vector not in PREDICTION_VECTORS:
            raise ConfigError(
                f"method.encoder={encoder!r} (choose {', '.join(ENCODERS)}) or method.prediction_vector="
                f"{prediction_vector!r} (choose {', '.join(PREDICTION_VECTORS)}) is not known"
            )
        self.two_class = prediction_vector == "two_class"
        if hidden_dim < 2 or huber_delta <= 0 or unlabeled_ratio < 0:
            raise ConfigError(
                f"method.hidden_dim={hidden_dim} must be >= 2, huber_delta={huber_delta} > 0 and "
                f"unlabeled_ratio={unlabeled_ratio} >= 0 (0: no unlabeled memes, no consistency term)"
            )
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma)
        self.targets = self.objective.targets
        self.weights = {
            "fused": fused_weight,
            "diversity": diversity_weight,
            "consistency": consistency_weight,
        }
        self.huber_delta, self.unlabeled_ratio = huber_delta, unlabeled_ratio

        self.clip = frozen_clip(model, data, clip, "CMML-CLIP")
        dim, outputs = self.clip.embed_dim, len(self.targets)
        build = _encoder if encoder == "mlp" else nn.Linear
        self.image_encoder = build(dim, hidden_dim)
        self.text_encoder = build(dim, hidden_dim)
        self.image_classifier = nn.Linear(hidden_dim, outputs)
        self.text_classifier = nn.Linear(hidden_dim, outputs)
        self.attention = InstanceAttention(hidden_dim, attention_hidden)
        self.fused_classifier = nn.Linear(hidden_dim, outputs)

    def stages(self, max_steps: int) -> list[Stage]:
        return [Stage("train", max_steps, True, self.unlabeled_ratio, trainer=self.recipe)]

    def outputs(self, batch: Batch) -> Outputs:
        image, text = self.clip(batch)  # frozen [B, D] each
        hidden_image, hidden_text = self.image_encoder(image), self.text_encoder(text)  # [B, H] each
        fused, attention = self.attention(torch.stack([hidden_image, hidden_text], dim=1))
        return Outputs(
            self.fused_classifier(fused),
            self.image_classifier(hidden_image),
            self.text_classifier(hidden_text),
            fused,
            attention,
        )

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = self.outputs(batch)
        targets = self.objective.targets_of(batch)  # [B, targets], -1 unlabeled or not valid
        valid = valid_rows(batch)
        labeled = (targets >= 0).any(dim=1)  # [B], valid rows only
        unlabeled = ~labeled if valid is None else ~labeled & valid  # [B]
        p_image, p_text = out.image.float().sigmoid(), out.text.float().sigmoid()
        loss_of = self.objective.loss_of
        losses = {
            "cls_loss": self.weights["fused"] * loss_of(out.fused, targets),
            "unimodal_loss": loss_of(out.image, targets) + loss_of(out.text, targets),
            "diversity_loss": self.weights["diversity"]
            * diversity_loss(p_image, p_text, labeled, self.two_class),
            "consistency_loss": self.weights["consistency"]
            * robust_consistency_loss(p_image, p_text, unlabeled, self.huber_delta, self.two_class),
        }
        report = accuracies(out.fused.detach(), targets, self.targets)
        with torch.no_grad():
            report["accuracy_image"] = accuracies(out.image, targets, self.targets)["accuracy"]
            report["accuracy_text"] = accuracies(out.text, targets, self.targets)["accuracy"]
            report["attention_image"] = masked_mean(out.attention[:, 0], valid)
            report["labeled_share"] = masked_mean(labeled.float(), valid)
        return losses, report

    def embed(self, batch: Batch) -> Tensor:
        return self.outputs(batch).hidden

    def predict(self, batch: Batch) -> Tensor:
        return self.outputs(batch).fused

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self.outputs(batch)
        return out.hidden, out.fused


def _encoder(in_dim: int, hidden_dim: int) -> nn.Sequential:
    """A modality's frozen feature to its hidden vector: ``in_dim -> 2 hidden -> hidden``, ReLU."""
    return nn.Sequential(
        nn.Linear(in_dim, 2 * hidden_dim), nn.ReLU(), nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU()
    )
