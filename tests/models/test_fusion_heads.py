"""Heads and fusion heads against naive computations written out here (loops, no tricks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memetrain.models import AlignFusion, ConcatFusion, CrossFusion, LateFusion, LinearHead, MLPHead

B, DI, DT, OUT = 3, 6, 5, 2


@pytest.fixture
def features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(B, DI, generator=generator), torch.randn(B, DT, generator=generator)


def linear(layer: nn.Linear, x: list[float]) -> list[float]:
    """``layer(x)`` for one vector, as sums."""
    weight, bias = layer.weight.tolist(), layer.bias.tolist()
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]


def unit(x: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in x))
    return [v / norm for v in x]


def hidden_then_output(head: nn.Module, fused: list[float], widths: list[int]) -> list[float]:
    """The pre-output MLP as the head is meant to be, whatever its modules say: a Linear then a ReLU
    for each width after the first (dropout is the identity in eval), then the output layer. Only
    the weights come from the head, and its linear layers must have exactly these shapes."""
    layers = [module for module in head.hidden if isinstance(module, nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in layers] == list(zip(widths[1:], widths[:-1]))
    assert tuple(head.output.weight.shape) == (OUT, widths[-1])
    for layer in layers:
        fused = [max(v, 0.0) for v in linear(layer, fused)]
    return linear(head.output, fused)


def test_late_fusion_is_the_mean_of_two_linear_heads(features):
    torch.manual_seed(0)
    head = LateFusion(DI, DT, OUT).eval()
    image, text = features
    logits = head(image, text)
    for b in range(B):
        image_logits = linear(head.image_head, image[b].tolist())
        text_logits = linear(head.text_head, text[b].tolist())
        expected = [(i + t) / 2 for i, t in zip(image_logits, text_logits)]
        assert logits[b].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(head.embed(image, text), torch.cat([image, text], dim=1))


def test_concat_fusion_is_an_mlp_over_both(features):
    torch.manual_seed(0)
    head = ConcatFusion(DI, DT, OUT, hidden_dim=4, depth=2).eval()
    image, text = features
    logits = head(image, text)
    assert logits.shape == (B, OUT) and head.embed(image, text).shape == (B, 4) and head.embed_dim == 4
    for b in range(B):
        expected = hidden_then_output(head, image[b].tolist() + text[b].tolist(), [DI + DT, 4, 4])
        assert logits[b].tolist() == pytest.approx(expected, abs=1e-5)


def test_align_fusion_is_the_product_of_unit_projections(features):
    torch.manual_seed(0)
    head = AlignFusion(DI, DT, OUT, dim=4, depth=1).eval()
    image, text = features
    logits = head(image, text)
    assert logits.shape == (B, OUT) and head.embed_dim == 4
    for b in range(B):
        p_i = unit(linear(head.image_proj[0], image[b].tolist()))
        p_t = unit(linear(head.text_proj[0], text[b].tolist()))
        fused = [i * t for i, t in zip(p_i, p_t)]
        assert logits[b].tolist() == pytest.approx(hidden_then_output(head, fused, [4, 4]), abs=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_cross_fusion_is_the_flattened_interaction_matrix(features, depth):
    torch.manual_seed(0)
    dim = 3
    head = CrossFusion(DI, DT, OUT, dim=dim, depth=depth).eval()
    image, text = features
    logits = head(image, text)
    assert logits.shape == (B, OUT) and head.embed_dim == (dim if depth else dim * dim)
    for b in range(B):
        p_i = unit(linear(head.image_proj[0], image[b].tolist()))
        p_t = unit(linear(head.text_proj[0], text[b].tolist()))
        matrix = [p_i[r] * p_t[c] for r in range(dim) for c in range(dim)]  # row-major, image index first
        expected = hidden_then_output(head, matrix, [dim * dim] + [dim] * depth)
        assert logits[b].tolist() == pytest.approx(expected, abs=1e-5)
    interaction = head.interact(*head.project(image, text)).view(B, dim, dim)
    p_i, p_t = head.project(image, text)
    assert torch.allclose(interaction, p_i.unsqueeze(2) * p_t.unsqueeze(1))
    assert torch.allclose(interaction.diagonal(dim1=1, dim2=2), p_i * p_t)  # align fusion is its diagonal


def test_fusion_dropout_is_active_in_training(features):
    torch.manual_seed(0)
    head = CrossFusion(DI, DT, OUT, dim=8).train()
    assert not torch.equal(head(*features), head(*features))
    head.eval()
    assert torch.equal(head(*features), head(*features))


def test_unimodal_heads(features):
    torch.manual_seed(0)
    image, _ = features
    probe = LinearHead(DI, OUT)
    assert torch.allclose(probe(image), image @ probe.output.weight.T + probe.output.bias)
    assert torch.equal(probe.embed(image), image) and probe.embed_dim == DI
    head = MLPHead(DI, OUT, hidden_dim=7, depth=2).eval()
    assert head(image).shape == (B, OUT) and head.embed(image).shape == (B, 7)
    for b in range(B):
        expected = hidden_then_output(head, image[b].tolist(), [DI, 7, 7])
        assert head(image)[b].tolist() == pytest.approx(expected, abs=1e-5)
