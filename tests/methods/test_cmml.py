"""CMML-CLIP: attention fusion, diversity and robust consistency by hand, how the step combines
them on labeled and unlabeled memes, training on SynthMemes, and a semi-supervised launcher run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from memetrain.data.semi_supervised import SemiSupervisedStream
from memetrain.data.stream import split_labels
from memetrain.errors import ConfigError
from memetrain.eval.fractions import label_fraction_indices
from memetrain.losses.consistency import diversity_loss, prediction_cosine, robust_consistency_loss
from memetrain.methods import build_method
from memetrain.methods.base import Stage
from memetrain.methods.cmml import InstanceAttention, attention_fusion
from tests.helpers import clip_weights_for, run_launcher, tiny_run_overrides, train_stream
from tests.methods.test_clip import DATA, SMALL, meme_batch
from tests.methods.test_tib_va import fit


def cmml(weights, data=DATA, **options):
    return build_method("cmml", {"clip": {"weights": str(weights), "embed_dim": 16}, **options}, SMALL, data)


def test_attention_weights_each_modality_by_its_own_score():
    # hidden: image (ln 3, 0), text (0, 2); score MLP: first coordinate -> ReLU -> identity, so
    # scores (ln 3, 0), softmax (3/4, 1/4), fused = 3/4 (ln 3, 0) + 1/4 (0, 2) = (3/4 ln 3, 1/2)
    attention = InstanceAttention(hidden_dim=2)
    with torch.no_grad():
        first, last = attention.score[0], attention.score[2]
        first.weight.copy_(torch.tensor([[1.0, 0.0]])), first.bias.zero_()
        last.weight.fill_(1.0), last.bias.zero_()
    hidden = torch.tensor([[[math.log(3), 0.0], [0.0, 2.0]]])  # [B=1, M=2, H=2]
    fused, weights = attention(hidden)
    assert torch.allclose(weights, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(fused, torch.tensor([[0.75 * math.log(3), 0.5]]))
    assert torch.allclose(attention_fusion(hidden, torch.tensor([[0.0, 1.0]])), torch.tensor([[0.0, 2.0]]))


def test_diversity_and_robust_consistency_by_hand():
    # predictions as two-class vectors: (1, 0) vs (1/2, 1/2): cos = (1/2) / sqrt(1/2) = sqrt(1/2);
    # (1/2, 1/2) vs (1/2, 1/2): cos 1; (0, 1) vs (1, 0): cos 0
    image = torch.tensor([[1.0], [0.5], [0.0]])
    text = torch.tensor([[0.5], [0.5], [1.0]])
    cos = prediction_cosine(image, text)
    assert torch.allclose(cos, torch.tensor([math.sqrt(0.5), 1.0, 0.0]))
    labeled = torch.tensor([True, True, False])
    assert diversity_loss(image, text, labeled).item() == pytest.approx((math.sqrt(0.5) + 1) / 2)
    # d = 2 - cos: 1 (under delta 1.003: d^2 / 2 = 0.5) and 2 (over: delta (d - delta / 2))
    delta = 1.003
    expected = (0.5 + delta * (2 - delta / 2)) / 2
    assert robust_consistency_loss(image, text, torch.tensor([False, True, True]), delta).item() == (
        pytest.approx(expected)
    )
    none = torch.zeros(3, dtype=torch.bool)
    assert robust_consistency_loss(image, text, none, delta).item() == 0.0


def test_a_step_weighs_the_terms_on_labeled_and_unlabeled_memes(clip_weights):
    method = cmml(clip_weights[0], fused_weight=3.0, diversity_weight=0.5, consistency_weight=2.0).eval()
    batch = {**meme_batch(), "labels": torch.tensor([[1], [0], [1], [-1], [-1], [-1]])}
    losses, report = method.training_step(batch)
    out = method.outputs(batch)
    labels = batch["labels"][:, 0].tolist()
    fused, image, text = (logits[:, 0].tolist() for logits in (out.fused, out.image, out.text))
    labeled = [row for row, label in enumerate(labels) if label >= 0]
    unlabeled = [row for row, label in enumerate(labels) if label < 0]

    def bce(logits: list[float]) -> float:  # mean over the labeled memes, written out
        total = 0.0
        for row in labeled:
            p = 1 / (1 + math.exp(-logits[row]))
            total -= math.log(p) if labels[row] == 1 else math.log(1 - p)
        return total / len(labeled)

    def cosine(row: int) -> float:  # the two modalities' (p, 1 - p) vectors
        p = 1 / (1 + math.exp(-image[row]))
        q = 1 / (1 + math.exp(-text[row]))
        return (p * q + (1 - p) * (1 - q)) / (math.hypot(p, 1 - p) * math.hypot(q, 1 - q))

    def huber(d: float, delta: float = 1.003) -> float:
        return d * d / 2 if d <= delta else delta * (d - delta / 2)

    diversity = sum(cosine(row) for row in labeled) / len(labeled)
    consistency = sum(huber(2 - cosine(row)) for row in unlabeled) / len(unlabeled)
    assert losses["cls_loss"].item() == pytest.approx(3 * bce(fused), rel=1e-5)
    assert losses["unimodal_loss"].item() == pytest.approx(bce(image) + bce(text), rel=1e-5)
    assert losses["diversity_loss"].item() == pytest.approx(0.5 * diversity, rel=1e-5)
    assert losses["consistency_loss"].item() == pytest.approx(2 * consistency, rel=1e-5)
    assert consistency > 0 and report["labeled_share"].item() == 0.5
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(6))
    assert method.predict(batch).shape == (6, 1) and method.embed(batch).shape == (6, 256)


def test_one_semi_supervised_stage_and_bad_options(clip_weights):
    assert cmml(clip_weights[0], unlabeled_ratio=2.0).stages(40) == [Stage("train", 40, True, 2.0)]
    with pytest.raises(ConfigError, match="huber_delta"):
        cmml(clip_weights[0], huber_delta=0)
    with pytest.raises(ConfigError, match="only for a stage that needs labels"):
        Stage("pretrain", 10, False, 1.0)


def test_trains_on_synthmemes_with_labeled_and_unlabeled_memes(synth_shards, synth_clip):
    weights, info, encoder = synth_clip
    labels = split_labels(synth_shards, "train")[:, 0]
    labeled = np.flatnonzero(labels >= 0)[:48]
    stream = SemiSupervisedStream(
        train_stream(synth_shards, "train", encoder, batch_size=8, subset=labeled),
        train_stream(synth_shards, ["train", "unlabeled"], encoder, batch_size=8),
    )
    torch.manual_seed(0)
    method = cmml(weights, data=info, hidden_dim=32).train()
    batches = iter(stream)
    first = next(batches)
    assert (first["labels"][:8] >= 0).all() and (first["labels"][8:] == -1).all()
    start, end = fit(method, batches, first)
    assert end < 0.75 * start


@pytest.mark.slow
def test_semi_supervised_run_through_the_launcher(synth_shards, tmp_path):
    weights = clip_weights_for(synth_shards, tmp_path / "clip.safetensors")
    run_dir = tmp_path / "cmml"
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, run_dir, steps=6), "method=cmml", "model=clip_small",
        f"method.clip.weights={weights}", "data.label_fraction=0.3", "method.unlabeled_ratio=0.5",
        "eval.tsne=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    labeled = len(label_fraction_indices(split_labels(synth_shards, "train")[:, 0], 0.3, seed=0))
    assert f"cmml on train ({labeled} labeled) + train+unlabeled (labels hidden)" in result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocols"]["classifier"]["splits"]["test"]["auroc"] is not None
    rows = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "train/consistency_loss" in row]
    assert logged and all(row["train/labeled_share"] == pytest.approx(16 / 24) for row in logged)
    assert (run_dir / "checkpoints" / "step_0000006" / "model.safetensors").is_file()
