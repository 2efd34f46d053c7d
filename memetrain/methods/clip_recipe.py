"""The pieces of the CASS study's "simple CLIP" (its table 3 CLIP row), options of ``method=clip``:
the residual projection head and the per-tower learning rates of moein-shariatnia/OpenAI-CLIP
(``modules.py`` 48-69; the notebook "OpenAI CLIP Simple Implementation.ipynb": image encoder lr 1e-4,
text encoder lr 1e-5, heads lr 1e-3 with weight decay 1e-3, AdamW); its loss is
:class:`memetrain.losses.contrastive.SoftTargetClipLoss`."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from memetrain.engine.optim import SCHEDULED_DECAY
from memetrain.errors import ConfigError

PROJECTIONS = ("linear", "residual")
TOWER_PARTS = ("image_encoder", "text_encoder", "heads")


class ResidualProjection(nn.Module):
    """``x -> p = W1 x``; ``LayerNorm(p + Dropout(W2 GELU(p)))``: the simple CLIP's projection head
    (one residual block, ``num_projection_layers = 1``; dropout 0.1 there)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, features: Tensor) -> Tensor:
        projected = self.projection(features)  # [B, out_dim]
        return self.layer_norm(projected + self.dropout(self.fc(self.gelu(projected))))


def projection(kind: str, in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    """``linear``: CLIP's bias-free linear projection (Radford et al. sec. 2.5); ``residual``: the
    simple CLIP's :class:`ResidualProjection`."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "residual":
        return ResidualProjection(in_dim, out_dim, dropout)
    raise ConfigError(f"method.projection={kind!r}: choose one of {', '.join(PROJECTIONS)}")


def tower_groups(
    towers: nn.Module, lr_scales: Mapping[str, float], weight_decay: float, encoder_weight_decay: float
) -> list[dict]:
    """Parameter groups with their own learning rate (``lr_scale`` times the trainer's ``lr``): the image
    encoder, the text encoder and the rest (projection heads), as the simple CLIP's optimizer groups.
    ``weight_decay`` applies to the heads (the notebook's 1e-3 on every head parameter) and
    ``encoder_weight_decay`` to the encoders (0 there)."""
    unknown = set(lr_scales) - set(TOWER_PARTS)
    if unknown or set(lr_scales) != set(TOWER_PARTS):
        raise ConfigError(
            f"method.lr_scales={dict(lr_scales)}: give exactly {', '.join(TOWER_PARTS)} (the trainer's lr times each)"
        )
    parts = {"image_encoder": [], "text_encoder": [], "heads": []}
    for name, param in towers.named_parameters():
        if not param.requires_grad:
            continue
        part = name.split(".")[0]
        parts[part if part in ("image_encoder", "text_encoder") else "heads"].append(param)
    decay = {
        "image_encoder": encoder_weight_decay,
        "text_encoder": encoder_weight_decay,
        "heads": weight_decay,
    }
    return [
        {
            "params": params, "lr_scale": float(lr_scales[part]), "weight_decay": decay[part], "name": part,
            SCHEDULED_DECAY: part == "heads",  # the encoders keep encoder_weight_decay
        }
        for part, params in parts.items()
        if params
    ]  # fmt: skip
