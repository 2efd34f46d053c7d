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

What follows the reference code (facebookresearch/dino at 7c446df), option by option in
``configs/method/dino.yaml`` and the table sweeps: ``grad_clip_mode: per_parameter`` clips each
parameter's gradient on its own (``utils.clip_gradients``, utils.py 132-141; ours by default:
``global``, the joint norm); while the last layer is frozen its gradients are dropped (set to
None: ``utils.cancel_gradients_last_layer``, utils.py 144-149), so AdamW neither decays it nor
counts a step for it; ``drop_path_rate`` is the student ViT's stochastic depth (main_dino.py
105 and 161-165: 0.1, rising linearly over the blocks; the teacher has none); the crops' flip,
blur and solarisation are options of the ``multicrop`` view. Both clipping and dropping happen in
:meth:`Dino.clip_gradients`, which the engine calls between the backward and the optimizer step.

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
from timm.layers import DropPath, Format
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from memetrain.engine.optim import clip_global_norm, clip_per_parameter
from memetrain.engine.schedules import cosine, linear_warmup
from memetrain.errors import ConfigError
from memetrain.losses.dino import DinoLoss
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method, valid_rows
from memetrain.methods.registry import DataInfo, register
from memetrain.models import ImageEncoder, build_image_encoder
from memetrain.models.dino_head import DinoHead

GLOBAL_CROPS = 2
"""The multicrop view puts its 2 global crops first; only they go through the teacher."""
CLIP_MODES = ("global", "per_parameter")


@register
class Dino(Method):
    name = "dino"
    needs_labels = False
    sync_batchnorm = True  # as DINO's main_dino.py converts student and teacher

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
        grad_clip_mode: str = "global",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if grad_clip_mode not in CLIP_MODES:
            raise ConfigError(
                f"method.grad_clip_mode={grad_clip_mode!r}: choose one of {', '.join(CLIP_MODES)}"
            )
        if not 0 <= drop_path_rate < 1:
            raise ConfigError(f"method.drop_path_rate={drop_path_rate}: give a rate in [0, 1) (DINO's 0.1)")
        self.grad_clip_mode = grad_clip_mode
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
        if drop_path_rate > 0:  # the student's only, after the copy: the teacher has none
            set_drop_path(backbone, drop_path_rate)
        self.loss = DinoLoss(out_dim, student_temp, center_momentum)
        self.temps = (warmup_teacher_temp, teacher_temp, teacher_temp_warmup_steps)
        self.momenta = (teacher_momentum, teacher_momentum_end)
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.teacher_temp, self.momentum = warmup_teacher_temp, teacher_momentum  # step 0's values
        self._teacher_master: list[Tensor] | None = None  # see after_step; runtime only
        self.register_load_state_dict_post_hook(_forget_teacher_master)

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
    def clip_gradients(self, max_norm: float | None) -> Tensor:
        """DINO's order (main_dino.py 329-335): clip (each parameter's gradient on its own with
        ``grad_clip_mode: per_parameter``, else their joint norm), then, while the last layer is
        frozen, drop its gradients (set them to None, as ``cancel_gradients_last_layer`` does: the
        optimizer then skips it, no weight decay and no moment update). Returns the joint norm of
        the student's gradients before clipping."""
        clip = clip_per_parameter if self.grad_clip_mode == "per_parameter" else clip_global_norm
        norm = clip(self.student.parameters(), max_norm)
        head = self.student["head"]
        if head.freeze_last_layer:
            for param in head.last_layer.parameters():
                param.grad = None
        return norm

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """teacher <- m * teacher + (1 - m) * student, parameter by parameter, in float32.

        A half-precision teacher would not follow: with 1 - m <= 0.004 each step's increment falls
        below its rounding step (bf16 stays put, fp16 drifts). Where the networks are held in fp16
        or bf16 (DeepSpeed's fp16 mode halves the whole model), the average runs on float32 master
        copies of the teacher, written back after each step; they are taken from the teacher when
        first needed and again after a checkpoint is loaded (which holds the teacher as the
        networks are held). Under autocast the weights stay float32 and no copy is made.
        """
        m = self.momentum_at(step, total_steps)
        teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
        average = self._float32_teacher(teacher)
        torch._foreach_mul_(average, m)
        torch._foreach_add_(average, [p.float() for p in student], alpha=1 - m)
        if average is not teacher:
            torch._foreach_copy_(teacher, average)

    def _float32_teacher(self, teacher: list[Tensor]) -> list[Tensor]:
        """The teacher's parameters where they are float32, else their float32 master copies."""
        if all(p.dtype == torch.float32 for p in teacher):
            self._teacher_master = None
            return teacher
        master = self._teacher_master
        if master is None or master[0].device != teacher[0].device:
            self._teacher_master = [p.float() for p in teacher]
        return self._teacher_master

    # -- steps -----------------------------------------------------------------------------------

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if "views" not in batch or len(batch["views"]) < GLOBAL_CROPS:
            raise ConfigError("DINO needs multi-crop views: set method.view.name=multicrop")
        device = self.loss.center.device  # the engine moves tensors, not the list of views
        crops = [crop.to(device, non_blocking=True) for crop in batch["views"]]
        with torch.no_grad():
            teacher_features, teacher_out = _encode(self.teacher, crops[:GLOBAL_CROPS])
        _, student_out = _encode(self.student, crops)
        valid = valid_rows(batch)  # rows that are not valid count in neither the loss nor the center
        terms = self.loss(student_out, teacher_out, self.teacher_temp, valid)
        self.loss.update_center(teacher_out, valid)
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
        terms = self.loss(
            student_out.repeat(2, 1, 1), teacher_out.repeat(2, 1, 1), self.teacher_temp, valid_rows(batch)
        )
        return {
            "same_view_loss": terms["dino_loss"],
            "teacher_entropy": terms["teacher_entropy"],
            "embedding_std": embedding_std(features),
        }

    def embed(self, batch: Batch) -> Tensor:
        return self.teacher["backbone"](batch["image"])  # [B, D]: the teacher's, as in the paper


def _forget_teacher_master(method: Dino, incompatible_keys: Any) -> None:
    """After a checkpoint is loaded the teacher is the checkpoint's: its master copies start again from it."""
    method._teacher_master = None


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


def set_drop_path(backbone: ImageEncoder, rate: float) -> None:
    """Stochastic depth on a timm ViT's residual branches, rising linearly from 0 at the first
    block to ``rate`` at the last (DINO's vision_transformer.py: ``torch.linspace(0, drop_path_rate,
    depth)``); refused for backbones without such blocks (DINO's ResNet recipe has none)."""
    blocks = getattr(backbone.model, "blocks", None)
    if not isinstance(backbone.model, VisionTransformer) or blocks is None:
        raise ConfigError(
            f"method.drop_path_rate={rate} applies to ViT backbones only; {type(backbone.model).__name__} "
            "has no transformer blocks: set method.drop_path_rate=0 (DINO's ResNet-50 recipe has none)"
        )
    for block, block_rate in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        block.drop_path1 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(block_rate) if block_rate > 0 else nn.Identity()


def _accept_any_input_size(backbone: ImageEncoder) -> None:
    """Local crops are smaller than global ones. A timm ViT built for one image size resamples its
    position embeddings to each input's grid once ``dynamic_img_size`` is on (what timm's constructor
    sets up for ``dynamic_img_size=True``; DINO's ``interpolate_pos_encoding``). CNNs take any size."""
    model = backbone.model
    if isinstance(model, VisionTransformer) and not model.dynamic_img_size:
        model.dynamic_img_size = True
        model.patch_embed.strict_img_size = False
        model.patch_embed.flatten, model.patch_embed.output_fmt = False, Format.NHWC
