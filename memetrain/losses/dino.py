"""The DINO self-distillation loss with its center (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, sec. 3.1 and Algorithm 1).

"We learn to match these distributions by minimizing the cross-entropy loss w.r.t. the parameters
of the student network: min H(P_t(x), P_s(x')) ... for every x in the global views and every x'
in all views, x' != x." The teacher's outputs are centred (a running mean is subtracted) and
sharpened (a low temperature); "centering prevents one dimension to dominate but encourages
collapse to the uniform distribution, while the sharpening has the opposite effect".

The teacher temperature is passed in by the caller, whose schedule lives outside the loss::

    loss = DinoLoss(out_dim=4096)
    terms = loss(student_outputs, teacher_outputs, teacher_temp=0.04)  # {"dino_loss", "teacher_entropy"}
    loss.update_center(teacher_outputs)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax of each global crop and the
    student's log-softmax of every other crop, averaged over those pairs and the batch's valid rows.

    ``center`` ``[1, K]`` is a buffer: it moves with the module and is saved in checkpoints. Rows
    marked invalid (``valid`` False: a stand-in for a bad sample, or padding) count neither in the
    loss nor in the center.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @in_float32
    def teacher_probs(self, teacher_outputs: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - center) / teacher_temp) over the last dimension, in float32, without gradient."""
        return F.softmax((teacher_outputs.detach() - self.center.float()) / teacher_temp, dim=-1)

    @in_float32
    def forward(
        self,
        student_outputs: list[Tensor] | Tensor,
        teacher_outputs: list[Tensor] | Tensor,
        teacher_temp: float,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``student_outputs``: S crops of ``[B, K]`` (a list or ``[S, B, K]``); ``teacher_outputs``:
        the T <= S global crops ``[T, B, K]``, crop ``i`` of both being the same image crop;
        ``valid``: bool ``[B]``, the rows averaged over (default all).

        Returns ``dino_loss`` and ``teacher_entropy`` (mean entropy of the teacher's distributions:
        near log K the outputs are uniform, near 0 one dimension dominates; both are collapse).
        """
        student = torch.stack(student_outputs) if isinstance(student_outputs, list) else student_outputs
        teacher = torch.stack(teacher_outputs) if isinstance(teacher_outputs, list) else teacher_outputs
        student_log_probs = F.log_softmax(student / self.student_temp, dim=-1)  # [S, B, K]
        probs = self.teacher_probs(teacher, teacher_temp)  # [T, B, K]
        # t: teacher crop, s: student crop, b: batch, k: output dimension
        cross_entropy = -torch.einsum("tbk,sbk->tsb", probs, student_log_probs)  # [T, S, B]
        cross_entropy = masked_mean(cross_entropy, valid, dim=-1)  # [T, S]
        other_crop = ~torch.eye(*cross_entropy.shape, dtype=torch.bool, device=cross_entropy.device)
        entropy = masked_mean(-(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1), valid)  # [T, B] -> []
        return {"dino_loss": cross_entropy[other_crop].mean(), "teacher_entropy": entropy}

    @torch.no_grad()
    @in_float32
    def update_center(self, teacher_outputs: list[Tensor] | Tensor, valid: Tensor | None = None) -> None:
        """center <- m * center + (1 - m) * mean of the teacher outputs over crops, the valid rows
        (bool ``[B]``, default all) and ranks; unchanged when no rank has a valid row."""
        teacher = torch.stack(teacher_outputs) if isinstance(teacher_outputs, list) else teacher_outputs
        teacher = teacher.detach()  # [T, B, K]
        counted = (
            torch.ones(teacher.shape[1], dtype=torch.bool, device=teacher.device) if valid is None else valid
        )
        total = torch.where(counted[:, None], teacher, 0).sum(dim=(0, 1))  # [K]
        rows = (counted.sum() * teacher.shape[0]).to(total.dtype)  # [], T * valid B
        stats = torch.cat([total, rows[None]])  # [K + 1]: one all-reduce for both
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, rows = stats[:-1], stats[-1]
        moved = self.center * self.center_momentum + total / rows.clamp(min=1) * (1 - self.center_momentum)
        self.center.copy_(torch.where(rows > 0, moved, self.center))
