"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021).

A student (image backbone + :class:`DinoHead`) learns to match, on every multi-crop view, the
centred and sharpened output of a teacher on the *other* global crops; the teacher is an exponential
moving average of the student and gets no gradients. Evaluation (linear probe, kNN) uses the
teacher's backbone features, as in the paper. Any timm backbone works through ``model.image``:
ResNets, and ViTs, which resample their position embeddings for the smaller local crops.

    python launcher/train.py method=dino model=backbone_resnet18 eval=probe            # CPU
    python launcher/train.py method=dino model=backbone_vit_tiny eval=probe data.label_fraction=0.05
    torchrun --nproc_per_node 8 launcher/train.py method=dino model=backbone_vit_b16 eval=probe \\
        data=hateful_memes data.image_size=224 method.view.local_size=96 method.out_dim=65536 \\
        trainer.global_batch_size=1024 trainer.lr=2.0e-3 trainer.precision=bf16

Fine-tune the result with ``method=supervised method.init.image={path: <run>/checkpoints/<step>/model.safetensors,
prefix: teacher.backbone.}``.

Besides ``dino_loss`` the step reports ``teacher_entropy``, ``teacher_temp``, ``momentum``, and two
collapse monitors: ``embedding_std`` of the teacher's backbone features and ``embedding_std_head`` of
its head outputs. Stability (``configs/method/dino.yaml`` has the numbers):

- small batches: raise ``teacher_momentum`` (0.9995 instead of 0.996) and lower ``out_dim``;
- NaN losses in fp16: train in bf16 or fp32 and keep ``trainer.grad_clip`` (3.0);
- collapse: ``embedding_std`` or ``embedding_std_head`` towards 0 (the trainer warns below 0.1), or
  ``dino_loss`` stuck at log(out_dim) with ``teacher_entropy`` near log(out_dim) (uniform outputs) or
  near 0 (one dimension dominates). The head collapses first: the backbone's ``embedding_std`` keeps
  its initial value while the backbone stops learning. Check ``center_momentum`` (0.9), keep
  ``teacher_temp`` <= 0.07 and the last layer frozen for the first steps (``freeze_last_layer_steps``).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from memetrain.engine.schedules import cosine, linear_warmup
from memetrain.errors import ConfigError
from memetrain.losses.dino import DinoLoss
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method
from memetrain.methods.registry import DataInfo, register
from memetrain.models import ImageEncoder, build_image_encoder
from memetrain.models.dino_head import DinoHead

GLOBAL_CROPS = 2
"""The multicrop view puts its 2 global crops first; only they go through the teacher."""


@register
class Dino(Method):
    name = "dino"
    needs_labels = False

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        *,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        use_bn_in_head: bool,
        norm_last_layer: bool,
        student_temp: float,
        teacher_temp: float,
        warmup_teacher_temp: float,
        teacher_temp_warmup_steps: int,
        center_momentum: float,
        teacher_momentum: float,
        teacher_momentum_end: float,
        freeze_last_layer_steps: int,
    ):
        super().__init__()
        backbone = build_image_encoder(**_image_config(model))
        _accept_any_input_size(backbone)
        head = DinoHead(
            backbone.out_dim,
            out_dim,
            hidden_dim,
            bottleneck_dim,
            use_bn=use_bn_in_head,
            norm_last_layer=norm_last_layer,
        )
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.loss = DinoLoss(out_dim, student_temp, center_momentum)
        self.temps = (warmup_teacher_temp, teacher_temp, teacher_temp_warmup_steps)
        self.momenta = (teacher_momentum, teacher_momentum_end)
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.teacher_temp, self.momentum = warmup_teacher_temp, teacher_momentum  # step 0's values

    # -- schedules: pure functions of the step ---------------------------------------------------

    def teacher_temp_at(self, step: int) -> float:
        """Linear warmup from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
        start, end, warmup_steps = self.temps
        return linear_warmup(step, warmup_steps, start, end)

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Teacher EMA momentum: cosine from ``teacher_momentum`` to ``teacher_momentum_end`` (1)."""
        return cosine(step, total_steps, *self.momenta)

    def before_step(self, step: int, total_steps: int) -> None:
        self.teacher_temp = self.teacher_temp_at(step)
        self.momentum = self.momentum_at(step, total_steps)
        self.student["head"].freeze_last_layer = step < self.freeze_last_layer_steps

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """teacher <- m * teacher + (1 - m) * student, parameter by parameter."""
        m = self.momentum_at(step, total_steps)
        teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1 - m)

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if "views" not in batch or len(batch["views"]) < GLOBAL_CROPS:
            raise ConfigError("DINO needs multi-crop views: set method.view.name=multicrop")
        device = self.loss.center.device  # the engine moves tensors, not the list of views
        crops = [crop.to(device, non_blocking=True) for crop in batch["views"]]
        with torch.no_grad():
            teacher_features, teacher_out = _encode(self.teacher, crops[:GLOBAL_CROPS])
        _, student_out = _encode(self.student, crops)
        terms = self.loss(student_out, teacher_out, self.teacher_temp)
        self.loss.update_center(teacher_out)
        entropy = terms.pop("teacher_entropy")
        report = {
            "teacher_entropy": entropy,
            "embedding_std": embedding_std(teacher_features),
            # the head collapses first: its outputs turn identical across memes while the backbone's
            # features keep their initial spread (the trainer warns on every embedding_std*)
            "embedding_std_head": embedding_std(teacher_out.flatten(0, 1)),
            "teacher_temp": entropy.new_tensor(self.teacher_temp),
            "momentum": entropy.new_tensor(self.momentum),
        }
        return terms, report

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict[str, Tensor]:
        """On the uncropped eval view: the loss between student and teacher on the same image (below
        the training loss, which pairs different crops), the teacher's entropy and the embedding
        spread. The center is not updated."""
        image = [batch["image"]]
        features, teacher_out = _encode(self.teacher, image)
        _, student_out = _encode(self.student, image)
        # the loss pairs each teacher crop with every *other* student crop: with the one view given
        # twice, both pairs are (teacher, student) on the same image
        terms = self.loss(student_out.repeat(2, 1, 1), teacher_out.repeat(2, 1, 1), self.teacher_temp)
        return {
            "same_view_loss": terms["dino_loss"],
            "teacher_entropy": terms["teacher_entropy"],
            "embedding_std": embedding_std(features),
        }

    def embed(self, batch: Batch) -> Tensor:
        return self.teacher["backbone"](batch["image"])  # [B, D]: the teacher's, as in the paper


def _encode(network: nn.ModuleDict, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Backbone features ``[V * B, D]`` and head outputs ``[V, B, K]`` of ``V`` crops of ``[B, 3, h, w]``,
    with one backbone pass per run of same-size crops (DINO's MultiCropWrapper)."""
    features = torch.cat(
        [
            network["backbone"](torch.cat(list(same_size)))
            for _, same_size in itertools.groupby(crops, key=lambda crop: crop.shape[-2:])
        ]
    )
    return features, network["head"](features).view(len(crops), crops[0].shape[0], -1)


def _image_config(model: dict[str, Any]) -> dict[str, Any]:
    """``model.image``, refusing what DINO would otherwise silently ignore."""
    hint = "use an image-only backbone config such as model=backbone_resnet18 or model=backbone_vit_tiny"
    if model.get("text"):
        raise ConfigError(f"DINO pretrains an image backbone only, but model.text is set; {hint}")
    if model.get("head"):
        raise ConfigError(
            "DINO trains its own projection head (method.out_dim, hidden_dim, bottleneck_dim), so "
            f"model.head would be unused; {hint}"
        )
    if not model.get("image"):
        raise ConfigError(f"DINO needs model.image; {hint}")
    return model["image"]


def _accept_any_input_size(backbone: ImageEncoder) -> None:
    """Local crops are smaller than global ones. A timm ViT built for one image size resamples its
    position embeddings to each input's grid once ``dynamic_img_size`` is on (what timm's constructor
    sets up for ``dynamic_img_size=True``; DINO's ``interpolate_pos_encoding``). CNNs take any size."""
    model = backbone.model
    if isinstance(model, VisionTransformer) and not model.dynamic_img_size:
        model.dynamic_img_size = True
        model.patch_embed.strict_img_size = False
        model.patch_embed.flatten, model.patch_embed.output_fmt = False, Format.NHWC
