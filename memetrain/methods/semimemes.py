"""SemiMemes: semi-supervised meme classification over frozen CLIP features (Tung et al., "SemiMemes:
A Semi-supervised Learning Approach for Multimodal Memes Analysis", 2023).

Two stages, run one after the other in one job (:meth:`stages`), each with its own optimizer,
schedule and checkpoints under ``<run>/stages/<stage>/``:

1. ``autoencoders`` (``autoencoder_steps`` steps, no labels: every training meme and the data's
   unlabeled splits): two cross-modal auto-encoders learn to predict the text feature from the
   image feature and the image feature from the text feature (MSE,
   :func:`memetrain.losses.cross_reconstruction_loss`);
2. ``classifier`` (``trainer.max_steps`` steps on the labeled fraction): an MLP over
   ``[image, text, AE_i(image), AE_t(text)]`` (the raw features and the auto-encoders' latents,
   the paper's "raw and cooked" features), trained with BCE or focal loss; the auto-encoders are
   frozen.

The CLIP towers are frozen throughout and always in eval mode (:mod:`memetrain.methods.frozen_clip`):
our own CLIP run's weights (``clip.tower: memetrain`` with the same ``model`` config, ``clip.weights``
its ``checkpoints/step_N/model.safetensors``) or an open_clip model with a local checkpoint
(``clip.tower: open_clip``, ``clip.open_clip_model``, ``clip.open_clip_weights``). Features are
L2-normalised as CLIP compares them.

    python launcher/train.py method=clip model=clip_small eval=probe
    python launcher/train.py method=semimemes model=clip_small data.label_fraction=0.05 \\
        method.clip.weights=runs/synth/clip-clip_small-seed0/checkpoints/step_0000600/model.safetensors
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.losses import cross_reconstruction_loss
from memetrain.losses.monitor import embedding_std
from memetrain.methods.base import Batch, Method, Stage
from memetrain.methods.frozen_clip import frozen_clip
from memetrain.methods.objective import ClassificationObjective
from memetrain.methods.registry import DataInfo, register
from memetrain.models.autoencoder import CrossModalAutoencoder
from memetrain.models.heads import mlp

AUTOENCODERS, CLASSIFIER = "autoencoders", "classifier"


@register
class SemiMemes(Method):
    name = "semimemes"
    needs_labels = True

    def __init__(
        self,
        model: dict[str, Any],
        data: DataInfo,
        clip: dict[str, Any],
        autoencoder_steps: int = 300,
        hidden_dim: int = 512,
        latent_dim: int = 256,
        classifier_hidden_dim: int = 512,
        classifier_depth: int = 2,
        dropout: float = 0.2,
        loss: str = "bce",
        focal_gamma: float = 2.0,
        targets: list[str] | None = None,
    ):
        super().__init__()
        if autoencoder_steps < 1:
            raise ConfigError(f"method.autoencoder_steps={autoencoder_steps} must be at least 1")
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma)
        self.targets, self.autoencoder_steps = self.objective.targets, autoencoder_steps

        self.clip = frozen_clip(model, data, clip, "SemiMemes")
        dim = self.clip.embed_dim
        self.image_to_text = CrossModalAutoencoder(dim, dim, hidden_dim, latent_dim)
        self.text_to_image = CrossModalAutoencoder(dim, dim, hidden_dim, latent_dim)
        self.hidden, width = mlp(2 * dim + 2 * latent_dim, classifier_hidden_dim, classifier_depth, dropout)
        self.output = nn.Linear(width, len(self.targets))
        self.stage = CLASSIFIER

    # -- stages ----------------------------------------------------------------------------------

    def stages(self, max_steps: int) -> list[Stage]:
        return [Stage(AUTOENCODERS, self.autoencoder_steps, False), Stage(CLASSIFIER, max_steps, True)]

    def start_stage(self, stage: Stage) -> None:
        """Only the current stage's part trains; the CLIP towers never do."""
        self.stage = stage.name
        for module in (self.image_to_text, self.text_to_image):
            module.requires_grad_(stage.name == AUTOENCODERS)
        for module in (self.hidden, self.output):
            module.requires_grad_(stage.name == CLASSIFIER)

    # -- the two objectives ----------------------------------------------------------------------

    def features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Frozen, L2-normalised CLIP features of the image and the text, ``[B, D]`` each."""
        return self.clip(batch)

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        image, text = self.features(batch)
        if self.stage == AUTOENCODERS:
            terms = cross_reconstruction_loss(
                self.image_to_text(image), text, self.text_to_image(text), image
            )
            report = {name: value for name, value in terms.items() if not name.endswith("_loss")}
            report["embedding_std_latent"] = embedding_std(self.image_to_text.encode(image).detach())
            return {"reconstruction_loss": terms["reconstruction_loss"]}, report
        return self.objective(self.output(self._cooked(image, text)), batch["labels"])

    def _cooked(self, image: Tensor, text: Tensor) -> Tensor:
        """The classifier's hidden representation of raw and auto-encoded features ``[B, width]``."""
        latents = [self.image_to_text.encode(image), self.text_to_image.encode(text)]  # [B, latent_dim] each
        return self.hidden(torch.cat([image, text, *latents], dim=1))

    def embed(self, batch: Batch) -> Tensor:
        return self._cooked(*self.features(batch))

    def predict(self, batch: Batch) -> Tensor:
        return self.output(self._cooked(*self.features(batch)))
