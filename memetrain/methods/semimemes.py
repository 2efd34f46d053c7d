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
L2-normalised as CLIP compares them (``features: normalized``), or as CLIP's towers give them
(``raw``: the paper's 768-d OpenAI ViT-L/14 features, saved unnormalised by its
``src/clip_feature_extractor.py`` 24-25).

The paper's own network and training, from its code (FPTU-Thesis-CSAI/SemiMemes), are options;
the defaults are ours:

- ``autoencoder: semimemes``: each auto-encoder is a linear encoder to a latent as wide as the
  feature and a PReLU + linear decoder (``src/model/AutoEncoder.py`` 4-32); ours (``mlp``):
  Linear-GELU-Linear halves through ``hidden_dim`` to ``latent_dim``;
- ``classifier: branches``: the raw image, raw text and both latents each through their own
  Linear -> ReLU -> Dropout(``dropout``) to ``branch_dim`` (256), concatenated, then one linear
  output per target (``ModelCombineAE``, AutoEncoder.py 34-82); ours (``mlp``): one MLP over the
  concatenation;
- ``loss: resample``: its distribution-balanced loss (:class:`memetrain.losses.resample.ResampleLoss`);
- ``autoencoder_recipe`` and ``recipe``: each stage's optimiser and schedule (``src/pretrain.py`` 12-14:
  Adam lr 2e-4, weight decay 1e-4, StepLR gamma 0.95 per epoch, 100 epochs; ``train_2_stages.py``
  65-85 and ``scripts/ours_*.sh``: Adam lr 1e-4, no decay, StepLR gamma 0.93 / 0.90 / 0.85 per epoch
  at 5 / 10 / 30 %, 50 epochs, batch 40), as trainer options.

Ours, not the paper's, in either setting: the auto-encoders train together in one stage (their
losses sum over disjoint parameters, so Adam moves each as if alone) on every training meme and
the unlabeled splits (the paper's on the memes outside the labeled fraction).

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
from memetrain.methods.base import Batch, Method, Stage, check_recipe, valid_rows
from memetrain.methods.clip_features import clip_features
from memetrain.methods.frozen_clip import frozen_clip
from memetrain.methods.objective import ClassificationObjective
from memetrain.methods.registry import DataInfo, register
from memetrain.models.autoencoder import CrossModalAutoencoder
from memetrain.models.heads import mlp

AUTOENCODERS, CLASSIFIER = "autoencoders", "classifier"
FEATURES, AUTOENCODER_KINDS, CLASSIFIER_KINDS = (
    ("normalized", "raw"),
    ("mlp", "semimemes"),
    ("mlp", "branches"),
)


class LinearAutoencoder(nn.Module):
    """SemiMemes' auto-encoder (src/model/AutoEncoder.py 4-32): ``encode`` is one linear layer to a
    latent as wide as the input, the decoder a PReLU (one slope per unit) and one linear layer."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.encoder = nn.Linear(in_dim, in_dim)
        self.decoder = nn.Sequential(nn.PReLU(num_parameters=in_dim), nn.Linear(in_dim, out_dim))
        self.latent_dim = in_dim

    def encode(self, features: Tensor) -> Tensor:
        return self.encoder(features)  # [B, in_dim]

    def forward(self, features: Tensor) -> Tensor:
        return self.decoder(self.encoder(features))  # [B, out_dim]


class BranchClassifier(nn.Module):
    """SemiMemes' classifier (``ModelCombineAE``, src/model/AutoEncoder.py 34-82): each input through
    its own Linear -> ReLU -> Dropout to ``branch_dim``, the branches concatenated."""

    def __init__(self, in_dims: list[int], branch_dim: int, dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, branch_dim), nn.ReLU(), nn.Dropout(dropout)) for dim in in_dims
        )
        self.out_dim = branch_dim * len(in_dims)

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch, x in zip(self.branches, inputs)], dim=1)


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
        features: str = "normalized",
        autoencoder: str = "mlp",
        classifier: str = "mlp",
        branch_dim: int = 256,
        resample: dict[str, Any] | None = None,
        autoencoder_recipe: dict[str, Any] | None = None,
    ):
        super().__init__()
        if autoencoder_steps < 1:
            raise ConfigError(f"method.autoencoder_steps={autoencoder_steps} must be at least 1")
        for option, value, choices in (
            ("features", features, FEATURES),
            ("autoencoder", autoencoder, AUTOENCODER_KINDS),
            ("classifier", classifier, CLASSIFIER_KINDS),
        ):
            if value not in choices:
                raise ConfigError(f"method.{option}={value!r}: choose one of {', '.join(choices)}")
        self.objective = ClassificationObjective(data, targets, loss, focal_gamma, resample=resample)
        self.targets, self.autoencoder_steps = self.objective.targets, autoencoder_steps
        self.autoencoder_recipe = check_recipe(autoencoder_recipe, "method.autoencoder_recipe")

        self.clip = frozen_clip(model, data, clip, "SemiMemes")
        self.normalize = features == "normalized"
        dim = self.clip.embed_dim
        if autoencoder == "semimemes":
            self.image_to_text, self.text_to_image = LinearAutoencoder(dim, dim), LinearAutoencoder(dim, dim)
        else:
            self.image_to_text = CrossModalAutoencoder(dim, dim, hidden_dim, latent_dim)
            self.text_to_image = CrossModalAutoencoder(dim, dim, hidden_dim, latent_dim)
        latent = self.image_to_text.latent_dim
        if classifier == "branches":
            self.hidden = BranchClassifier([dim, dim, latent, latent], branch_dim, dropout)
            width = self.hidden.out_dim
        else:
            self.hidden, width = mlp(2 * dim + 2 * latent, classifier_hidden_dim, classifier_depth, dropout)
        self.output = nn.Linear(width, len(self.targets))
        self.stage = CLASSIFIER

    # -- stages ----------------------------------------------------------------------------------

    def stages(self, max_steps: int) -> list[Stage]:
        return [
            Stage(AUTOENCODERS, self.autoencoder_steps, False, trainer=self.autoencoder_recipe),
            Stage(CLASSIFIER, max_steps, True, trainer=self.recipe),
        ]

    def start_stage(self, stage: Stage) -> None:
        """Only the current stage's part trains; the CLIP towers never do."""
        self.stage = stage.name
        for module in (self.image_to_text, self.text_to_image):
            module.requires_grad_(stage.name == AUTOENCODERS)
        for module in (self.hidden, self.output):
            module.requires_grad_(stage.name == CLASSIFIER)

    # -- the two objectives ----------------------------------------------------------------------

    def features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Frozen CLIP features of the image and the text, ``[B, D]`` each: L2-normalised, or raw."""
        return clip_features(self.clip, batch, self.normalize)

    def training_step(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        image, text = self.features(batch)
        if self.stage == AUTOENCODERS:
            terms = cross_reconstruction_loss(
                self.image_to_text(image), text, self.text_to_image(text), image, valid_rows(batch)
            )
            report = {name: value for name, value in terms.items() if not name.endswith("_loss")}
            report["embedding_std_latent"] = embedding_std(self.image_to_text.encode(image).detach())
            return {"reconstruction_loss": terms["reconstruction_loss"]}, report
        return self.objective(self.output(self._cooked(image, text)), batch)

    def _cooked(self, image: Tensor, text: Tensor) -> Tensor:
        """The classifier's hidden representation of raw and auto-encoded features ``[B, width]``."""
        latents = [self.image_to_text.encode(image), self.text_to_image.encode(text)]  # [B, latent_dim] each
        if isinstance(self.hidden, BranchClassifier):
            return self.hidden(image, text, *latents)
        return self.hidden(torch.cat([image, text, *latents], dim=1))

    def embed(self, batch: Batch) -> Tensor:
        return self._cooked(*self.features(batch))

    def predict(self, batch: Batch) -> Tensor:
        return self.output(self._cooked(*self.features(batch)))

    def embed_and_predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        cooked = self._cooked(*self.features(batch))
        return cooked, self.output(cooked)
