"""Attribute probes (eval.targets): multi-class metrics, probe and kNN over class ids, and their
place in a protocol's results; zero-shot scoring from prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.eval import zero_shot as zs
from memetrain.eval.metrics import multiclass_metrics
from memetrain.eval.probe import knn_class_scores, knn_scores, linear_probe_classes
from memetrain.eval.protocols import Outputs, _score_attribute, check_attribute_targets


def _auroc_by_ranks(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half: the Mann-Whitney definition."""
    pos, neg = scores[positive], scores[~positive]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def test_multiclass_metrics_by_hand():
    labels = np.array([0, 1, 2, 2])
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    m = multiclass_metrics(labels, probabilities, ["a", "b", "c"])  # predicted: 0, 2, 2, 1
    assert m["accuracy"] == 0.5 and m["chance"] == 0.5 and m["num_samples"] == 4
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    # F1 per class: a 1 (tp 1), b 0 (tp 0), c 0.5 (tp 1, fp 1, fn 1)
    assert m["per_class"]["a"]["f1"] == 1.0 and m["per_class"]["b"]["f1"] == 0.0
    assert m["per_class"]["c"]["f1"] == pytest.approx(0.5) and m["per_class"]["c"]["support"] == 2
    assert m["f1_macro"] == pytest.approx(0.5)
    assert m["f1_weighted"] == pytest.approx((1 * 1 + 0 * 1 + 0.5 * 2) / 4)
    expected = np.mean([_auroc_by_ranks(labels == c, probabilities[:, c]) for c in range(3)])
    assert m["auroc_ovr"] == pytest.approx(expected)
    one = multiclass_metrics(np.array([1, 1]), np.array([[0.2, 0.8, 0.0], [0.6, 0.4, 0.0]]), ["a", "b", "c"])
    assert one["auroc_ovr"] is None and "only class 'b'" in one["auroc_reason"]
    with pytest.raises(ValueError, match="class ids 0..2"):
        multiclass_metrics(np.array([0, -1]), np.zeros((2, 3)), ["a", "b", "c"])


def test_knn_class_votes_by_hand_and_the_binary_vote_is_its_class_1_share():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    y = np.array([0, 2, 1, -1])  # the last row is unlabeled: never a neighbour
    query = np.array([[1.0, 0.2]])
    votes = knn_class_scores(bank, y, query, num_classes=3, k=2, temperature=0.5)
    unit = query / np.linalg.norm(query)
    sims = (bank[:3] / np.linalg.norm(bank[:3], axis=1, keepdims=True)) @ unit[0]
    top = np.argsort(-sims)[:2]  # rows 0 (class 0) and 2 (class 1)
    weights = np.exp(sims[top] / 0.5)
    expected = np.zeros(3)
    for row, weight in zip(top, weights):
        expected[y[row]] += weight
    np.testing.assert_allclose(votes[0], expected / weights.sum())
    binary = np.array([0, 1, 1, 0])
    np.testing.assert_allclose(
        knn_scores(bank, binary, query, k=3), knn_class_scores(bank, binary, query, 2, k=3)[:, 1]
    )


def blobs(seed: int, n: int = 60, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = np.eye(classes, 5) * 6
    return centres[y] + rng.normal(size=(n, 5)), y


def test_linear_probe_over_class_ids_separates_blobs_and_gives_absent_classes_nothing():
    x, y = blobs(0)
    qx, qy = blobs(1)
    probabilities = linear_probe_classes(x, y, {"test": qx}, num_classes=4, seed=0)["test"]
    assert probabilities.shape == (60, 4) and (probabilities[:, 3] == 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == qy).all()
    with pytest.raises(ConfigError, match="at least two classes"):
        linear_probe_classes(x, np.zeros_like(y), {"test": qx}, num_classes=3, seed=0)


def _outputs(x: np.ndarray, labels: np.ndarray) -> Outputs:
    return Outputs([f"m{i:03d}" for i in range(len(x))], labels, x, None)


@pytest.mark.parametrize("protocol", ["linear_probe", "knn"])
def test_an_attribute_of_class_ids_gets_multiclass_metrics_and_a_0_1_one_binary_metrics(protocol, tmp_path):
    x, y = blobs(0)
    qx, qy = blobs(1)
    columns = lambda y: np.stack([y % 2, y, (y == 0).astype(int)], axis=1)  # noqa: E731 main, class ids, 0/1
    train = _outputs(x, columns(y))
    outputs = {"dev": _outputs(qx, columns(qy)), "test": _outputs(qx[:30], columns(qy[:30]))}
    names = ["hateful", "shape", "round"]
    shape = _score_attribute(
        protocol, "shape", outputs, train, names, ["a", "b", "c"], "dev", 0.05, None, 0, 5, None, tmp_path
    )
    assert shape["kind"] == "classes" and shape["classes"] == ["a", "b", "c"]
    assert shape["splits"]["test"]["accuracy"] == 1.0 and shape["splits"]["test"]["label_fraction"] == 0.05
    assert shape["splits"]["test"]["num_samples"] == 30
    rows = (tmp_path / f"{protocol}_shape_test.csv").read_text().splitlines()
    assert rows[0] == "id,prediction,label,p_a,p_b,p_c" and len(rows) == 31
    round_ = _score_attribute(
        protocol, "round", outputs, train, names, None, "dev", 0.05, None, 0, 5, None, tmp_path
    )
    assert round_["kind"] == "binary" and round_["threshold_source"] == "dev"
    assert round_["splits"]["test"]["auroc"] == 1.0


def test_eval_targets_must_be_label_columns_once():
    assert check_attribute_targets(["shape"], ["hateful", "shape"]) == ["shape"]
    with pytest.raises(ConfigError, match=r"eval.targets=\['colour'\]: each must be a label column"):
        check_attribute_targets(["colour"], ["hateful", "shape"])
    with pytest.raises(ConfigError, match="once"):
        check_attribute_targets(["shape", "shape"], ["hateful", "shape"])


def test_zero_shot_prompts_are_checked_per_label():
    settings = zs.ZeroShotSettings(
        "image", {"hateful": {"negative": ["a meme"], "positive": ["a hateful meme"]}}
    )
    assert settings.class_prompts("hateful", None) == [["a meme"], ["a hateful meme"]]
    with pytest.raises(ConfigError, match=r"no prompts for label 'shape': add eval.zero_shot.prompts.shape="):
        settings.class_prompts("shape", ["a", "b"])
    bad = zs.ZeroShotSettings("image", {"shape": {"a": ["x"], "b": []}})
    with pytest.raises(ConfigError, match=r"prompts for each of \['a', 'b'\].*empty: \['b'\]"):
        bad.class_prompts("shape", ["a", "b"])
    with pytest.raises(ConfigError, match="eval.zero_shot.embed='text'"):
        zs.ZeroShotSettings("text", {})


class PromptTower(torch.nn.Module):
    """A 'CLIP' whose text tower maps a prompt to a fixed vector, at a logit scale of 10."""

    name = "fake"
    VECTORS = {"p0": [1.0, 0.0], "p1": [0.6, 0.8], "q": [0.0, 1.0]}

    def embed_prompts(self, batch):
        return torch.tensor([self.VECTORS[text] for text in batch["text"]])

    def zero_shot_embed(self, batch, kind):
        raise NotImplementedError

    def logit_scale(self):
        return torch.tensor(10.0)


def test_zero_shot_classes_average_their_prompts_and_score_a_softmax_of_scaled_cosines():
    method = PromptTower()
    classes = zs.class_embeddings(method, [["p0", "p1"], ["q"]], None, "cpu")
    first = np.array([1.6, 0.8]) / 2
    np.testing.assert_allclose(classes[0].numpy(), 10 * first / np.linalg.norm(first), rtol=1e-6)
    np.testing.assert_allclose(classes[1].numpy(), [0.0, 10.0])
    features = np.array([[1.0, 0.0], [0.0, 1.0]])
    logits = features @ classes.numpy().T
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(zs.probabilities(features, classes), expected, rtol=1e-6)
    zs.check_method(method)
    with pytest.raises(ConfigError, match="zero_shot needs a CLIP-style method.*method dino has none"):
        zs.check_method(type("ImageOnly", (), {"name": "dino", "embed": lambda self, batch: None})())
