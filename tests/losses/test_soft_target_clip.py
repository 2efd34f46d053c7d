"""The simple CLIP's soft-target loss (moein-shariatnia/OpenAI-CLIP CLIP.py 33-51), the CASS study's
CLIP row: a naive loop reference, a case by hand, the CLIP options that select it (residual heads,
per-tower learning rates, a fixed temperature), and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.losses.contrastive import SoftTargetClipLoss
from memetrain.methods.clip_recipe import ResidualProjection
from tests.methods.test_clip import clip, meme_batch


def naive_soft_target_loss(image: list[list[float]], text: list[list[float]], temperature: float) -> float:
    """Every entry with Python floats: row softmax of the mean self-similarities as targets, cross
    entropy of the text-to-image logits (rows) and of their transpose against the transposed targets."""
    n = len(image)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    logits = [[dot(text[i], image[j]) / temperature for j in range(n)] for i in range(n)]
    sims = [
        [(dot(image[i], image[j]) + dot(text[i], text[j])) / 2 * temperature for j in range(n)]
        for i in range(n)
    ]
    targets = []
    for row in sims:
        exps = [math.exp(v) for v in row]
        targets.append([e / sum(exps) for e in exps])

    def log_softmax(row):
        top = max(row)
        log_sum = top + math.log(sum(math.exp(v - top) for v in row))
        return [v - log_sum for v in row]

    total = 0.0
    for i in range(n):
        text_loss = -sum(t * lp for t, lp in zip(targets[i], log_softmax(logits[i])))
        column = [logits[j][i] for j in range(n)]  # row i of logits.T
        image_loss = -sum(
            targets[j][i] * lp for j, lp in enumerate(log_softmax(column))
        )  # row i of targets.T
        total += (image_loss + text_loss) / 2
    return total / n


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_matches_a_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    loss = SoftTargetClipLoss(temperature)(image, text)["contrastive_loss"]
    assert loss.item() == pytest.approx(
        naive_soft_target_loss(image.tolist(), text.tolist(), temperature), rel=1e-5
    )


def test_a_two_meme_case_by_hand():
    # image = text = [[1], [0]] at T = 1: logits [[1, 0], [0, 0]], targets row 0 softmax([1, 0]) =
    # [e/(e+1), 1/(e+1)], row 1 [1/2, 1/2]; the matrices are symmetric, so both directions agree
    image = text = torch.tensor([[1.0], [0.0]])
    e = math.e
    log_p0 = [1 - math.log(e + 1), -math.log(e + 1)]  # log_softmax([1, 0])
    log_p1 = [-math.log(2), -math.log(2)]  # log_softmax([0, 0])
    row0 = -(e / (e + 1) * log_p0[0] + 1 / (e + 1) * log_p0[1])
    row1 = -(0.5 * log_p1[0] + 0.5 * log_p1[1])
    # transposed targets: column j of targets: [e/(e+1), 1/2] and [1/(e+1), 1/2]
    col0 = -(e / (e + 1) * log_p0[0] + 0.5 * log_p0[1])
    col1 = -(1 / (e + 1) * log_p1[0] + 0.5 * log_p1[1])
    expected = ((row0 + col0) / 2 + (row1 + col1) / 2) / 2
    assert SoftTargetClipLoss(1.0)(image, text)["contrastive_loss"].item() == pytest.approx(expected)


def test_invalid_rows_are_dropped():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    valid = torch.tensor([True, False, True, True])
    masked = SoftTargetClipLoss()(image, text, valid)["contrastive_loss"]
    kept = SoftTargetClipLoss()(image[valid], text[valid])["contrastive_loss"]
    torch.testing.assert_close(masked, kept)


def test_residual_projection_by_hand():
    head = ResidualProjection(2, 2, dropout=0.0)
    with torch.no_grad():
        head.projection.weight.copy_(torch.eye(2))
        head.projection.bias.zero_()
        head.fc.weight.zero_()
        head.fc.bias.copy_(torch.tensor([1.0, -1.0]))
    # p = x; p + fc(gelu(p)) = x + [1, -1]; LayerNorm of [a, b]: [+1, -1] x sign(a - b) (unit weights)
    out = head(torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -1.0]]), atol=1e-3, rtol=0)


def test_clip_with_the_simple_clips_recipe_trains_its_heads_at_their_own_rates():
    method = clip(
        loss="soft_targets", projection="residual", embed_dim=8,
        lr_scales={"image_encoder": 0.1, "text_encoder": 0.01, "heads": 1.0},
    )  # fmt: skip
    assert isinstance(method.model.image_projection, ResidualProjection)
    assert not method.model.logit_scale.requires_grad and method.edited_after_step() == []
    groups = {g["name"]: g for g in method.param_groups(weight_decay=1e-3)}
    assert (groups["image_encoder"]["lr_scale"], groups["text_encoder"]["lr_scale"]) == (0.1, 0.01)
    assert groups["heads"]["weight_decay"] == 1e-3 and groups["image_encoder"]["weight_decay"] == 0.0
    heads = {id(p) for p in groups["heads"]["params"]}
    assert {id(p) for p in method.model.image_projection.parameters()} <= heads
    losses, report = method.training_step(meme_batch())
    losses["contrastive_loss"].backward()
    assert report["logit_scale"] == 1.0 and method.model.logit_scale.grad is None
    # the loss is the soft-target loss of the unnormalised head outputs
    with torch.no_grad():
        method.eval()
        batch = meme_batch()
        image, text = method.model.encode_image(batch), method.model.encode_text(batch)
        expected = naive_soft_target_loss(image.tolist(), text.tolist(), 1.0)
        assert method.validation_step(batch)["contrastive_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_the_default_stays_open_clips_infonce():
    method = clip(embed_dim=8)
    assert method.loss_kind == "infonce" and method.model.logit_scale.requires_grad
    assert isinstance(method.model.image_projection, torch.nn.Linear)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "nce"}, "method.loss"),
        ({"projection": "mlp"}, "method.projection"),
        ({"lr_scales": {"heads": 1.0}}, "method.lr_scales"),
        ({"temperature": 0.0}, "method.temperature"),
    ],
)
def test_bad_options_are_refused(options, message):
    method = None
    with pytest.raises(ConfigError, match=message):
        method = clip(embed_dim=8, **options)
        method.param_groups(0.0)
