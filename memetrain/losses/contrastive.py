"""Image-text contrastive loss (CLIP) and the cross-rank feature gather it needs.

The gather is a free function, kept apart from the loss math, and both fall back to one process
when ``torch.distributed`` is not initialised, so the loss runs and is tested on one CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


def world_size() -> int:
    """Processes in the default group; 1 when ``torch.distributed`` is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when ``torch.distributed`` is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated in rank order: ``[B, ...]`` to ``[world * B, ...]``.

    Gradients flow back to each rank's own slice (the backward of the all-gather sums, over ranks,
    the gradients that reach that slice), so a loss over the gathered batch trains every rank's
    encoders. Every rank must pass the same shape. With one process, ``x`` itself.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over image-text pairs (Radford et al., "Learning Transferable Visual Models
    From Natural Language Supervision", ICML 2021, fig. 3), in open_clip's formulation (Ilharco et
    al. 2021; Cherti et al., "Reproducible scaling laws for contrastive language-image learning", 2023).

    Row ``i`` of ``image_features`` and of ``text_features`` come from the same meme; every other
    text (image) of the global batch is a negative. With ``local_loss`` (the default) each rank
    scores only its own rows against all ranks' columns, with labels offset by ``rank * B``, so the
    logits are ``[B, world * B]`` and memory grows with the local batch, not the global one; without
    it each rank builds the full ``[world * B, world * B]`` matrix. Both give the gradient of the
    loss over the global batch once DDP averages gradients over ranks.

    A row marked invalid (``valid`` False: a stand-in for a bad sample, or padding; ranks keep the
    same ``B``) is neither a query nor anyone's negative: its column is masked out of every row's
    softmax and the loss is the mean over the global batch's valid rows (with ``local_loss``, each
    rank divides its sum by the global valid count over ``world``, so that DDP's mean over ranks is
    that mean). With every row valid this is the loss above, exactly.

    ``forward`` returns ``contrastive_loss`` and the top-1 accuracies ``i2t_top1`` and ``t2i_top1``
    over the valid rows (the right text is the highest-scored of all valid columns; chance is
    ``1 / (world * B)``).
    """

    def __init__(self, local_loss: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self._labels: dict[tuple[torch.device, int, int], Tensor] = {}

    def labels(self, count: int, offset: int, device: torch.device) -> Tensor:
        """``offset + arange(count)``, cached per device, size and offset (runtime only, not state)."""
        key = (device, count, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + count, device=device)
        return self._labels[key]

    @in_float32
    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        gather: bool = True,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``image_features``, ``text_features``: ``[B, D]`` L2-normalised, this rank's memes.
        ``logit_scale``: ``[]`` the inverse temperature (already exponentiated and clamped).
        ``gather=False`` scores this rank's batch alone (validation, where ranks hold different counts).
        ``valid``: bool ``[B]``, the rows that count (default all); every rank passes one, or none does.
        """
        image, text = image_features, text_features  # float32 (logits up to 100), autocast off
        spread = gather and world_size() > 1
        all_image = gather_with_grad(image) if spread else image  # [N, D], N = world * B
        all_text = gather_with_grad(text) if spread else text  # [N, D]
        if valid is None:
            valid = torch.ones(len(image), dtype=torch.bool, device=image.device)  # [B]
            all_valid = torch.ones(len(all_image), dtype=torch.bool, device=image.device)  # [N]
        else:  # a mask: nothing flows back through it
            all_valid = gather_with_grad(valid.to(torch.uint8)).bool() if spread else valid  # [N]
        if self.local_loss:
            logits_per_image = logit_scale * image @ all_text.T  # [B, N]
            logits_per_text = logit_scale * text @ all_image.T  # [B, N]
            labels = self.labels(len(image), rank() * len(image) if spread else 0, image.device)  # [B]
            queries = valid  # [B]
        else:
            logits_per_image = logit_scale * all_image @ all_text.T  # [N, N]
            logits_per_text = logits_per_image.T  # [N, N]
            labels = self.labels(len(all_image), 0, image.device)  # [N]
            queries = all_valid  # [N]
        # an invalid column gets the lowest logit: exp(lowest - max) is 0, so it is no one's negative
        lowest = torch.finfo(logits_per_image.dtype).min
        logits_per_image = logits_per_image.masked_fill(~all_valid, lowest)  # [queries, N]
        logits_per_text = logits_per_text.masked_fill(~all_valid, lowest)  # [queries, N]
        per_query = (
            F.cross_entropy(logits_per_image, labels, reduction="none")
            + F.cross_entropy(logits_per_text, labels, reduction="none")
        ) / 2  # [B] or [N]
        # mean over the global batch's valid rows: local loss divides by this rank's share of them
        ranks_sharing = world_size() if spread and self.local_loss else 1
        loss = torch.where(queries, per_query, 0).sum() * ranks_sharing / all_valid.sum().clamp(min=1)
        with torch.no_grad():
            i2t = masked_mean((logits_per_image.argmax(dim=1) == labels).float(), queries)
            t2i = masked_mean((logits_per_text.argmax(dim=1) == labels).float(), queries)
        return {"contrastive_loss": loss, "i2t_top1": i2t, "t2i_top1": t2i}


class SoftTargetClipLoss(nn.Module):
    """The CLIP loss of the CASS study's CLIP row: a "simple CLIP" (moein-shariatnia/OpenAI-CLIP,
    ``CLIP.py`` 33-51) whose targets are not the identity but the softmax of the mean of the
    image-image and text-text similarities, at a fixed temperature (1.0 there):

        logits  = text @ image.T / T                                  [B, B], rows: texts
        targets = softmax((image @ image.T + text @ text.T) / 2 * T)  row-wise
        loss    = mean_i (CE_i(logits, targets) + CE_i(logits.T, targets.T)) / 2

    with ``CE_i(x, y) = -sum_j y_ij log_softmax(x)_ij``. As there, ``targets.T`` is the transposed
    row-softmax (its rows need not sum to 1), the embeddings are not L2-normalised (the study's
    projection heads end in a LayerNorm), and the negatives are this process's batch (the reference
    trains on one GPU; across processes each rank scores its own memes). Rows that are not valid
    are dropped before anything is computed.

    ``forward`` returns ``contrastive_loss``, and ``i2t_top1`` / ``t2i_top1`` over the kept rows.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    @in_float32
    def forward(self, image: Tensor, text: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        """``image``, ``text``: ``[B, D]`` embeddings of this rank's memes, row ``i`` of both the same
        meme; ``valid``: bool ``[B]`` (default all)."""
        if valid is not None:
            image, text = image[valid], text[valid]  # [V, D]
        if len(image) == 0:
            zero = image.sum() * 0 + text.sum() * 0  # keeps the graph: every rank runs a backward
            return {"contrastive_loss": zero, "i2t_top1": zero.detach(), "t2i_top1": zero.detach()}
        logits = text @ image.T / self.temperature  # [V, V]: row i is text i against every image
        similarity = (image @ image.T + text @ text.T) / 2  # [V, V]
        targets = F.softmax(similarity * self.temperature, dim=-1)  # [V, V], rows sum to 1
        texts_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=1)  # [V]
        images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(dim=1)  # [V]
        loss = ((images_loss + texts_loss) / 2).mean()
        with torch.no_grad():
            labels = torch.arange(len(image), device=image.device)
            t2i = (logits.argmax(dim=1) == labels).float().mean()
            i2t = (logits.T.argmax(dim=1) == labels).float().mean()
        return {"contrastive_loss": loss, "i2t_top1": i2t, "t2i_top1": t2i}
