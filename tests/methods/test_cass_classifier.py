"""CASS comparing the two networks' own classifiers (``method.compare=classifier``), as the CASS code
does (pranavsinghps1/CASS CASS.ipynb 338-339, 363-365): the loss is 2 - 2 cos between their logits,
both classifiers train, ``embed`` still gives the features before them; a backbone fine-tuned from
such a checkpoint loads without its classifier."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from memetrain.errors import ConfigError
from memetrain.methods import build_method
from memetrain.models import ImageEncoder
from tests.methods.test_cass import CNN, INFO, VIT, grad_norms, memes, naive_agreement


def cass_comparing_classifiers(**options):
    torch.manual_seed(0)
    return build_method("cass", {"compare": "classifier", **options}, {"cnn": CNN, "vit": VIT}, INFO)


def test_the_loss_is_the_agreement_of_the_two_classifiers_outputs():
    method, batch = cass_comparing_classifiers(variance_weight=0.0), memes()
    assert method.heads is None  # no projection heads: nothing between backbone and classifier
    losses, _ = method.training_step(batch)
    with torch.no_grad():  # the classifier applied by hand to the features forward() gives
        logits = {
            b: method.encoders[b].model.get_classifier()(method.encoders[b](batch["image"]))
            for b in ("cnn", "vit")
        }
    assert logits["cnn"].shape == logits["vit"].shape == (4, 1000)  # timm's ImageNet classes
    assert losses.keys() == {"agreement_loss"}
    assert losses["agreement_loss"].item() == pytest.approx(
        naive_agreement(logits["cnn"], logits["vit"]), abs=1e-5
    )


def test_both_networks_and_their_classifiers_train():
    method = cass_comparing_classifiers()
    losses, _ = method.training_step(memes())
    sum(losses.values()).backward()
    assert grad_norms(method).keys() == {"encoders.cnn", "encoders.vit"}
    classifiers = [method.encoders[b].model.get_classifier().weight.grad for b in ("cnn", "vit")]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in classifiers)


def test_embed_gives_the_features_before_the_classifier():
    method, batch = cass_comparing_classifiers(embed_from="vit").eval(), memes()
    with torch.no_grad():
        assert method.embed(batch).shape == (4, 64)  # test_vit's width, not its 1000 classes


def test_an_unknown_comparison_is_refused():
    with pytest.raises(ConfigError, match=r"^method.compare='logits': choose one of projection, classifier$"):
        cass_comparing_classifiers(compare="logits")


def test_a_backbone_fine_tuned_from_it_loads_without_the_classifier(tmp_path, caplog):
    pretrained = cass_comparing_classifiers()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(path))
    model = {"image": CNN, "text": None, "head": {"kind": "linear"}}
    init = {"image": {"path": str(path), "prefix": "encoders.cnn."}}
    with caplog.at_level(logging.INFO, logger="memetrain.models.weights"):
        tuned = build_method("supervised", {"init": init}, model, INFO)
    encoder, source = tuned.model.image_encoder, pretrained.encoders["cnn"]
    assert encoder.model.get_classifier().__class__ is torch.nn.Identity
    trunk = source.state_dict()
    assert encoder.state_dict().keys() == trunk.keys() - {"model.fc.weight", "model.fc.bias"}
    assert all(torch.equal(value, trunk[name]) for name, value in encoder.state_dict().items())
    assert "not loading model.fc.bias, model.fc.weight of encoders.cnn." in caplog.text


def test_an_encoder_that_dropped_its_classifier_has_no_logits():
    encoder = ImageEncoder(**CNN)
    assert encoder.dropped_names == ("model.fc.",)
    with pytest.raises(RuntimeError, match="keep_classifier=True"):
        encoder.logits(memes()["image"])
