"""SemiMemes as its code builds and trains it (FPTU-Thesis-CSAI/SemiMemes): its auto-encoder
(src/model/AutoEncoder.py 4-32), its four-branch classifier (34-82), unnormalised CLIP features,
the resample loss, and each stage's optimiser and schedule carried by the stages."""

from __future__ import annotations

import numpy as np
import torch

from memetrain.methods import DataInfo, build_method
from memetrain.methods.semimemes import BranchClassifier, LinearAutoencoder
from tests.methods.test_clip import SMALL, meme_batch

MAMI_B = DataInfo(["misogynous", "shaming", "stereotype"], "misogynous", vocab_size=50)
AE_RECIPE = {"optimizer": "adam", "lr": 2.0e-4, "weight_decay": 1.0e-4,
             "lr_schedule": {"kind": "step", "step_every": 214, "gamma": 0.95}}  # fmt: skip
RECIPE = {"optimizer": "adam", "lr": 1.0e-4, "weight_decay": 0.0,
          "lr_schedule": {"kind": "step", "step_every": 12, "gamma": 0.93}}  # fmt: skip


def paper_semimemes(weights):
    options = {
        "clip": {"weights": str(weights), "embed_dim": 16},
        "features": "raw", "autoencoder": "semimemes", "classifier": "branches", "branch_dim": 8,
        "dropout": 0.2, "loss": "resample", "targets": ["shaming", "stereotype"],
        "autoencoder_recipe": AE_RECIPE, "recipe": RECIPE,
    }  # fmt: skip
    return build_method("semimemes", options, SMALL, MAMI_B)


def test_the_papers_network(clip_weights):
    method = paper_semimemes(clip_weights[0])
    for autoencoder in (method.image_to_text, method.text_to_image):
        assert isinstance(autoencoder, LinearAutoencoder)
        assert isinstance(autoencoder.encoder, torch.nn.Linear) and autoencoder.encoder.weight.shape == (
            16,
            16,
        )
        prelu, linear = autoencoder.decoder
        assert isinstance(prelu, torch.nn.PReLU) and prelu.weight.shape == (16,)  # one slope per unit
        assert linear.weight.shape == (16, 16)
    assert isinstance(method.hidden, BranchClassifier) and len(method.hidden.branches) == 4
    for branch in method.hidden.branches:  # Linear(768 -> 256), ReLU, Dropout(0.2) in the paper
        linear, relu, dropout = branch
        assert linear.weight.shape == (8, 16) and isinstance(relu, torch.nn.ReLU) and dropout.p == 0.2
    assert method.output.weight.shape == (2, 32)  # 4 x 256 -> one output per target


def test_the_classifier_is_the_branches_by_hand(clip_weights):
    method = paper_semimemes(clip_weights[0]).eval()
    batch = meme_batch()
    with torch.no_grad():
        image, text = method.features(batch)
        parts = [image, text, method.image_to_text.encoder(image), method.text_to_image.encoder(text)]
        hidden = torch.cat(
            [
                torch.relu(b[0].weight @ x.T + b[0].bias[:, None]).T
                for b, x in zip(method.hidden.branches, parts)
            ],
            dim=1,
        )
        torch.testing.assert_close(method.predict(batch), method.output(hidden))


def test_features_are_raw_clip_embeddings(clip_weights):
    path, reference = clip_weights
    method = paper_semimemes(path)
    reference.eval()
    batch = meme_batch()
    image, text = method.features(batch)
    with torch.no_grad():
        torch.testing.assert_close(image, reference.model.encode_image(batch))
        torch.testing.assert_close(text, reference.model.encode_text(batch))
    assert not torch.allclose(image.norm(dim=1), torch.ones(len(image)))  # not L2-normalised


def test_each_stage_carries_its_papers_optimiser(clip_weights):
    autoencoders, classifier = paper_semimemes(clip_weights[0]).stages(600)
    assert dict(autoencoders.trainer) == AE_RECIPE and dict(classifier.trainer) == RECIPE
    trainer = {"optimizer": "adamw", "lr": 1e-3, "warmup_steps": 30}
    assert autoencoders.trainer_options(trainer)["optimizer"] == "adam"
    assert classifier.trainer_options(trainer)["warmup_steps"] == 30  # not in the recipe: the run's


def test_the_resample_loss_trains_the_classifier_stage(clip_weights):
    method = paper_semimemes(clip_weights[0])
    labels = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
    method.observe_labels(labels, MAMI_B.label_names)
    method.start_stage(method.stages(10)[1])
    batch = {
        **meme_batch(),
        "labels": torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0], [1, 0, 1]]),
    }
    losses, _ = method.training_step(batch)
    losses["cls_loss"].backward()
    assert torch.isfinite(losses["cls_loss"]) and method.output.weight.grad.abs().sum() > 0
