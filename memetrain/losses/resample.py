"""The distribution-balanced loss of SemiMemes (Wu et al., "Distribution-Balanced Loss for Multi-Label
Classification in Long-Tailed Datasets", ECCV 2020; mmdet's ``ResampleLoss``), with the settings
SemiMemes' code runs it with (FPTU-Thesis-CSAI/SemiMemes ``src/loss.py`` 85-173, defaults in
``src/arguments.py`` 171-182, class counts from the labeled fraction by ``src/data/create_freq_file.py``):

- re-balanced weighting: for meme ``b`` with labels ``y``, ``r_b = sum_k y_bk / n_k`` (``n_k``: the
  labeled memes positive for label ``k``), ``w_bk = sigmoid(beta (1 / (n_k r_b) - mu)) + alpha``
  with alpha 10, beta 0.2, mu 0.1 (SemiMemes' values; the paper's are 0.1, 10, 0.2); a meme
  without a positive label has ``r_b = 0`` and gets ``w = 1 + alpha``;
- negative-tolerant regularisation: the logits move by ``nu_k = -log(N / n_k - 1) x 0.1 / lambda``
  (``N`` labeled memes, init bias 0.1), negatives' logits are scaled by ``lambda = 5`` and their
  weights divided by it;
- binary cross-entropy with those weights, averaged over every (meme, label) entry; focal
  modulation off (SemiMemes' ``--focal`` defaults to False), available with ``focal=True``.

Prediction is unchanged: the shift and scale act inside the loss only (SemiMemes scores
``sigmoid(logits)``). Missing labels (-1) count in no term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses.masking import masked_mean
from memetrain.losses.precision import in_float32


class ResampleLoss(nn.Module):
    """Distribution-balanced BCE over ``[B, K]`` logits; :meth:`set_counts` gives it the labeled
    memes' positive counts per label before the first call."""

    def __init__(
        self,
        num_labels: int,
        alpha: float = 10.0,
        beta: float = 0.2,
        mu: float = 0.1,
        neg_scale: float = 5.0,
        init_bias: float = 0.1,
        focal: bool = False,
        gamma: float = 2.0,
        balance_param: float = 2.0,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.alpha, self.beta, self.mu = alpha, beta, mu
        self.neg_scale, self.init_bias = neg_scale, init_bias
        self.focal, self.gamma, self.balance_param, self.loss_weight = (
            focal,
            gamma,
            balance_param,
            loss_weight,
        )
        self.register_buffer("positives", torch.zeros(num_labels), persistent=False)  # n_k
        self.register_buffer("total", torch.zeros(()), persistent=False)  # N
        self.names = [str(k) for k in range(num_labels)]
        self.counted = False  # set_counts was called (runtime only: the run gives the counts again)

    def set_counts(self, positives: Tensor, total: int, names: list[str] | None = None) -> None:
        """``positives`` ``[K]``: labeled memes positive for each label; ``total``: labeled memes.
        Every label needs positive and negative memes (else its bias is infinite)."""
        names = names or self.names
        for name, count in zip(names, positives.tolist()):
            if not 0 < count < total:
                raise ConfigError(
                    f"method.loss=resample weighs labels by their frequency among the labeled memes, but label "
                    f"{name} is positive for {int(count)} of {total}: raise data.label_fraction or use method.loss=bce"
                )
        self.positives = positives.float().to(self.positives.device)
        self.total = torch.tensor(float(total), device=self.positives.device)
        self.names, self.counted = names, True

    @in_float32
    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``logits``, ``targets`` ``[B, K]``; targets 0/1, -1 where missing (not counted)."""
        if not self.counted:
            raise ConfigError(
                "method.loss=resample has no label counts: the run must call Method.observe_labels with the "
                "labeled memes' labels before training (memetrain/run.py)"
            )
        labeled = targets >= 0
        y = targets.clamp(min=0).float()  # [B, K]
        n = self.positives.to(logits.device)  # [K]
        inverse = 1.0 / n  # [K]
        repeat = (y * inverse).sum(dim=1, keepdim=True)  # [B, 1], r_b
        share = inverse / repeat.clamp(min=torch.finfo(repeat.dtype).tiny)  # [B, K], 1 / (n_k r_b)
        weight = torch.sigmoid(self.beta * (share - self.mu)) + self.alpha
        weight = torch.where(repeat > 0, weight, 1.0 + self.alpha)  # no positive label: r_b = 0
        bias = -torch.log(self.total.to(logits.device) / n - 1) * self.init_bias / self.neg_scale  # [K]
        shifted = logits + bias
        scaled = shifted * (1 - y) * self.neg_scale + shifted * y
        weight = weight / self.neg_scale * (1 - y) + weight * y
        loss = F.binary_cross_entropy_with_logits(scaled, y, weight=weight, reduction="none")  # [B, K]
        if self.focal:
            p_true = torch.exp(-F.binary_cross_entropy_with_logits(scaled, y, reduction="none"))
            loss = self.balance_param * (1 - p_true) ** self.gamma * loss
        return self.loss_weight * masked_mean(loss, labeled)
