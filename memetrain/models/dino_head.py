"""The DINO projection head (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, sec. 3.1 and appendix C): "a 3-layer multi-layer perceptron (MLP) with
hidden dimension 2048 followed by l2 normalization and a weight normalized fully connected layer
with K dimensions".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class DinoHead(nn.Module):
    """``[B, in_dim]`` -> MLP -> ``[B, bottleneck_dim]`` -> L2 normalise -> weight-normalised linear ``[B, out_dim]``.

    The last layer is ``g * v / ||v||`` per output unit. With ``norm_last_layer`` its scale ``g`` is
    fixed to 1 (every output unit's weight vector has unit norm), as DINO does for stability; without
    it ``g`` is learned (DINO: better for ViT-S, less stable). While ``freeze_last_layer`` is true the
    last layer's gradients are zeroed (DINO freezes it for the first epoch). Zeroing, rather than
    dropping the gradients or toggling ``requires_grad``, keeps DDP's gradient buckets intact. AdamW's
    decoupled weight decay still applies meanwhile: it shrinks ``v``, which the normalisation divides
    out, and a learned ``g`` by a factor of (1 - lr x weight decay) per step.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(layers - 1):
            blocks += [nn.Linear(in_dim, hidden_dim)]
            blocks += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            blocks += [nn.GELU()]
            in_dim = hidden_dim
        self.mlp = nn.Sequential(*blocks, nn.Linear(in_dim, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0  # g: [out_dim, 1]
        with torch.no_grad():
            scale.fill_(1.0)
        scale.requires_grad_(not norm_last_layer)
        self.freeze_last_layer = False
        for param in self.last_layer.parameters():
            if param.requires_grad:
                param.register_hook(self._gate_last_layer_grad)

    def _gate_last_layer_grad(self, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad) if self.freeze_last_layer else grad

    def forward(self, features: Tensor) -> Tensor:
        z = F.normalize(self.mlp(features), dim=-1)  # [B, bottleneck_dim], unit norm
        return self.last_layer(z)  # [B, out_dim]
