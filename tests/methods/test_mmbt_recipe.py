"""MMBT as MMF runs it (facebookresearch/mmf mmf/models/mmbt.py): the text in segment 0 and the image
in segment 1 (MMBTBase.forward), and the classification head MMBTForClassification builds: BERT's
pooler, dropout, the prediction-head transform (Linear, GELU, LayerNorm) and the output layer;
each against values written out here."""

from __future__ import annotations

import math

import pytest
import torch

from tests.methods.test_mmbt import meme_batch, mmbt


def test_mmf_segments_put_the_text_in_segment_0_and_the_image_in_segment_1():
    method = mmbt(num_image_tokens=3, image_segment=1).eval()
    sequence = method.sequence(meme_batch([[10, 11], [12]]))
    assert sequence.segments.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]] * 2  # [CLS] img x3 [SEP] | text
    assert sequence.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2  # as before: both restart


def _layer_norm(row: list[float], weight: list[float], bias: list[float], eps: float) -> list[float]:
    mean = sum(row) / len(row)
    var = sum((v - mean) ** 2 for v in row) / len(row)
    return [(v - mean) / math.sqrt(var + eps) * w + b for v, w, b in zip(row, weight, bias)]


def _linear(row: list[float], layer: torch.nn.Linear) -> list[float]:
    weight, bias = layer.weight.tolist(), layer.bias.tolist()
    return [sum(w * x for w, x in zip(wr, row)) + b for wr, b in zip(weight, bias)]


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def test_the_mmf_head_is_pooler_then_the_prediction_head_transform_then_output():
    method = mmbt(image_segment=1, head="mmf").eval()
    batch = meme_batch([[10, 11], [12]])
    with torch.no_grad():
        sequence = method.sequence(batch)
        cls_state = method.text_encoder(
            None, sequence.mask, inputs_embeds=sequence.embeds,
            token_type_ids=sequence.segments, position_ids=sequence.positions,
        )  # fmt: skip
        logits = method.predict(batch)
    dense, norm = method.head_transform.dense, method.head_transform.norm
    for row, got in zip(cls_state.tolist(), logits.tolist()):
        pooled = [math.tanh(v) for v in _linear(row, method.pooler[0])]  # BERT's pooler
        hidden = [_gelu(v) for v in _linear(pooled, dense)]  # BertPredictionHeadTransform
        hidden = _layer_norm(hidden, norm.weight.tolist(), norm.bias.tolist(), norm.eps)
        assert got == pytest.approx(_linear(hidden, method.output), rel=1e-4, abs=1e-5)
    assert norm.eps == method.text_encoder.model.config.layer_norm_eps
    features, predicted = method.embed_and_predict(batch)
    torch.testing.assert_close(predicted, logits)
    torch.testing.assert_close(features, method.pooler(cls_state))


def test_our_defaults_keep_the_linear_head_on_the_cls_state():
    method = mmbt().eval()
    assert isinstance(method.pooler, torch.nn.Identity) and isinstance(
        method.head_transform, torch.nn.Identity
    )
    assert method.image_segment == 0
