"""The classifier on stream-shaped batches, and the builders' errors."""

from __future__ import annotations

import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.models import (
    Classifier,
    CrossFusion,
    LateFusion,
    build_classifier,
    build_fusion,
    build_head,
    build_image_encoder,
    build_text_encoder,
)

VOCAB = 40
IMAGE = {"name": "test_resnet", "image_size": 32}  # timm's tiny test model, 96 features
LSTM = {"kind": "lstm", "vocab_size": VOCAB, "embed_dim": 16, "hidden_size": 8}
BERT = {"kind": "transformer", "vocab_size": VOCAB, "hidden_size": 32, "num_layers": 1, "num_heads": 2}


def batch(size: int = 3, length: int = 6) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, 3:] = 0
    return {
        "image": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator),
        "input_ids": torch.randint(5, VOCAB, (size, length), generator=generator) * mask,
        "attention_mask": mask,
        "label": torch.zeros(size, dtype=torch.long),
        "valid": torch.ones(size, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    ("image", "text", "head", "embed_dim"),
    [
        (IMAGE, None, {"kind": "linear"}, 96),
        (None, LSTM, {"kind": "mlp", "hidden_dim": 16}, 16),
        (None, BERT, {"kind": "linear"}, 32),
        (IMAGE, LSTM, {"kind": "late"}, 96 + 8),
        (IMAGE, BERT, {"kind": "concat", "hidden_dim": 24}, 24),
        (IMAGE, LSTM, {"kind": "align", "dim": 16}, 16),
        (IMAGE, BERT, {"kind": "cross", "dim": 8, "depth": 0}, 64),
    ],
)
def test_classifier_logits_and_embeddings(image, text, head, embed_dim):
    torch.manual_seed(0)
    model = build_classifier(num_outputs=2, image=image, text=text, head=head).eval()
    with torch.no_grad():
        assert model(batch()).shape == (3, 2)
        assert model.embed(batch()).shape == (3, embed_dim)
    assert (model.image_encoder is not None) == (image is not None)
    assert (model.text_encoder is not None) == (text is not None)


def test_classifier_trains_end_to_end():
    torch.manual_seed(0)
    model = build_classifier(num_outputs=1, image=IMAGE, text=LSTM, head={"kind": "concat", "hidden_dim": 8})
    model(batch()).sum().backward()
    assert all(p.grad is not None for p in model.image_encoder.parameters())
    assert model.text_encoder.embedding.weight.grad is not None


def test_classifier_says_what_the_batch_lacks():
    model = Classifier(LateFusion(96, 8, 1), build_image_encoder(**IMAGE), build_text_encoder(**LSTM))
    views_batch = {key: value for key, value in batch().items() if key != "image"}
    with pytest.raises(ConfigError, match="batch\\['image'\\]"):
        model(views_batch)


def test_unknown_kinds_list_the_choices():
    with pytest.raises(ConfigError, match="late, concat, align, cross"):
        build_fusion("bilinear", 4, 4, 1)
    with pytest.raises(ConfigError, match="lstm, transformer"):
        build_text_encoder("gru", vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="linear, mlp"):
        build_head("svm", 4, 1)
    with pytest.raises(ConfigError, match="late, concat, align, cross"):
        build_classifier(num_outputs=1, image=IMAGE, text=LSTM, head={"kind": "mlp"})
    with pytest.raises(ConfigError, match="linear, mlp"):
        build_classifier(num_outputs=1, image=IMAGE, head={"kind": "cross"})
    with pytest.raises(ConfigError, match="image encoder, a text encoder or both"):
        build_classifier(num_outputs=1, head={"kind": "linear"})


def test_unknown_and_missing_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['hidden'\].*hidden_dim"):
        build_fusion("concat", 4, 4, 1, hidden=8)
    with pytest.raises(ConfigError, match=r"missing option\(s\) \['vocab_size'\]"):
        build_text_encoder("lstm")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['layers'\].*pooling"):
        build_text_encoder("transformer", pretrained=str(tmp_path), num_layers=2, layers=2)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['img_size'\]"):
        build_image_encoder(name="resnet18", img_size=32)


def test_builders_return_the_configured_modules():
    head = build_fusion("cross", 10, 12, 3, dim=4)
    assert isinstance(head, CrossFusion) and head.image_proj[0].in_features == 10
    assert head.text_proj[0].in_features == 12 and head.output.out_features == 3
