"""TIB-VA: a multi-task classifier over frozen CLIP image and text embeddings (Hakimov, Cheema,
Ewerth, "TIB-VA at SemEval-2022 Task 5: A Multimodal Architecture for the Detection and
Classification of Misogynous Memes", SemEval 2022, arXiv:2204.06299), best in MAMI sub-task B.

Each modality's frozen CLIP embedding is projected to ``hidden_dim`` (256), with ReLU and dropout
0.2; the two projections are concatenated and fused by one linear layer with ReLU (256), and one
linear output per target reads the fused vector, all trained at once: the loss is the sum over
targets of each target's binary cross-entropy (the paper's five MAMI outputs, misogynous plus the
four types: run it with ``data=mami_tasks_ab``; with one target it is the same network with one
output). The optimiser is the run's trainer, as for the other methods of the comparison: the
paper's code uses Adam at lr 1e-4, betas (0.99, 0.98), weight decay 1e-4 and gradient clipping at 1
for about 2800 steps, which ``configs/method/tib_va.yaml`` shows as overrides (measured: at that lr
a 600-step SynthMemes run stays at chance).

Layer sizes, dropout, loss and optimiser follow the authors' public code
(TIBHannover/multimodal-misogyny-detection-mami-2022, ``train_multitask.py``). Its text branch is
an option: ``text: lstm`` runs a one-layer, one-way LSTM (256 units, no biases) over the frozen
CLIP text transformer's token states, every position of the context included as there (its masks
are passed but unused), and takes the final hidden state, then dropout 0.2 (``train_multitask.py``
47, 70-76; :func:`memetrain.methods.clip_features.text_token_states`: the states after CLIP's final
LayerNorm, our reading of the fork of OpenAI's CLIP it imports, which is not published with it).
Ours, the default (``text: pooled``): a projection of the pooled CLIP text embedding like the
image branch's. ``features: raw`` gives the image branch CLIP's embedding unnormalised, as there.

    python launcher/train.py method=clip model=clip_small eval=probe
    python launcher/train.py method=tib_va model=clip_small data.label_fraction=0.05 \\
        method.clip.weights=runs/synth/clip-clip_small-seed0/checkpoints/step_0000600/model.safetensors
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.methods.base import Batch, Method
from memetrain.methods.clip_features import clip_features, text_token_states, token_states_width
from memetrain.methods.frozen_clip import frozen_clip
from memetrain.methods.objective import ClassificationObjective
from memetrain.methods.registry import DataInfo, register


@register
class TibVa(Method):
    """TIB-VA. Options (``configs/method/tib_va.yaml`` says how to tune them): ``clip`` (the
    frozen feature extractor), ``hidden_dim``, ``dropout``, and ``targets``, ``loss`` and
    ``focal_gamma`` as in ``supervised``."""

    name = "tib_va"
    needs_labels = True

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        clip: dict[str, Any],
        hidden_dim: int = 256,
        dropout: float = 0.2,
        targets: list[str] | None = None,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        text: str = "pooled",
        features: str = "normalized",
    ):
        super().__init__()
        if text not in ("pooled", "lstm") or features not in ("normalized", "raw"):
            raise ConfigError(
                f"method.text={text!r} (choose pooled or lstm) or method.features={features!r} "
                "(choose normalized or raw) is not known"
            )
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma, sum_over_targets=True)
        self.targets = self.objective.targets
        self.clip = frozen_clip(model, data, clip, "TIB-VA")
        self.text_kind, self.normalize = text, features == "normalized"
        dim = self.clip.embed_dim
        self.image_projection = _projection(dim, hidden_dim, dropout)
        if text == "lstm":
            self.text_lstm = nn.LSTM(
                token_states_width(self.clip), hidden_dim, 1, bias=False, batch_first=True
            )
            self.text_dropout = nn.Dropout(dropout)
        else:
            self.text_projection = _projection(dim, hidden_dim, dropout)
        self.fusion = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU())
        self.output = nn.Linear(hidden_dim, len(self.targets))  # one output (head) per target

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.objective(self.predict(batch), batch)

    def embed(self, batch: Batch) -> Tensor:
        image, text = clip_features(self.clip, batch, self.normalize)  # frozen [B, D] each
        if self.text_kind == "lstm":
            states, _ = text_token_states(self.clip, batch)  # frozen [B, L, width], every position
            _, (last, _) = self.text_lstm(states)  # last: [1, B, hidden]
            text_part = self.text_dropout(last[0])
        else:
            text_part = self.text_projection(text)
        projected = [self.image_projection(image), text_part]  # [B, hidden] each
        return self.fusion(torch.cat(projected, dim=1))  # [B, hidden]

    def predict(self, batch: Batch) -> Tensor:
        return self.output(self.embed(batch))  # [B, targets]

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        features = self.embed(batch)
        return features, self.output(features)


def _projection(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
