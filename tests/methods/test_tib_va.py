"""TIB-VA: the multi-task loss by hand, the network's shape, training on SynthMemes, and tasks A and
B of a MAMI-format pack through the launcher (classifier and one linear probe per label)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from memetrain.data.pack import PackOptions, pack
from memetrain.data.sources.mami import Mami
from memetrain.losses import masked_bce
from memetrain.methods import DataInfo, build_method
from tests.data.test_mami import HEADER, write_image, write_lines
from tests.helpers import clip_weights_for, run_launcher, tiny_run_overrides, train_stream
from tests.methods.test_clip import SMALL, meme_batch

MAMI = DataInfo(
    label_names=["misogynous", "shaming", "stereotype", "objectification", "violence"],
    main_label="misogynous",
    vocab_size=50,
)


def tib_va(weights, data=MAMI, **options):
    return build_method(
        "tib_va", {"clip": {"weights": str(weights), "embed_dim": 16}, **options}, SMALL, data
    )


def test_multi_task_loss_is_the_sum_of_each_targets_mean_bce(clip_weights):
    # target 0: meme 0 (label 1, logit 0) -> ln 2; meme 1 unlabeled: mean ln 2
    # target 1: meme 0 (label 0, logit ln 3: p = 3/4) -> -ln(1/4) = ln 4; meme 1 (label 1, logit 0) -> ln 2
    #   mean (ln 4 + ln 2) / 2 = 1.5 ln 2;  sum over targets: 2.5 ln 2 (the mean of all entries: 4/3 ln 2)
    method = tib_va(clip_weights[0], targets=["misogynous", "shaming"])
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]])
    labels = torch.tensor([[1, 0, 0, 0, 0], [-1, 1, 0, 0, 0]])
    losses, report = method.objective(logits, {"labels": labels})
    assert losses["cls_loss"].item() == pytest.approx(2.5 * math.log(2))
    assert masked_bce(logits, labels[:, :2]).item() == pytest.approx(4 / 3 * math.log(2))
    assert report["accuracy"].item() == 0.0  # logit 0 predicts 0, the label is 1
    assert report["accuracy_shaming"].item() == 0.0  # 3/4 -> 1 (label 0), 1/2 -> 0 (label 1)


def test_the_network_paper_sized_and_frozen(clip_weights):
    method = tib_va(clip_weights[0], targets=list(MAMI.label_names))
    assert [m.out_features for m in (method.image_projection[0], method.text_projection[0])] == [256, 256]
    assert method.fusion[0].in_features == 512 and method.output.out_features == 5
    assert method.image_projection[2].p == 0.2
    batch = {**meme_batch(), "labels": torch.tensor([[1, 0, 1, 0, 0]] * 6)}
    method.train()
    losses, _ = method.training_step(batch)
    losses["cls_loss"].backward()
    assert not method.clip.training and all(p.grad is None for p in method.clip.parameters())
    assert method.output.weight.grad.abs().sum() > 0 and method.text_projection[0].weight.grad.abs().sum() > 0
    assert method.predict(batch).shape == (6, 5) and method.embed(batch).shape == (6, 256)


def fit(method, batches, first, steps: int = 40, lr: float = 1e-2) -> tuple[float, float]:
    """``steps`` AdamW steps on five streamed batches, then on ``first`` alone; returns the loss on
    ``first`` (eval mode) before and after. Every step's losses must be finite."""
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)

    def loss_on_first() -> float:
        method.eval()
        with torch.no_grad():
            losses, _ = method.training_step(first)
        method.train()
        return sum(losses.values()).item()

    start = loss_on_first()
    for step in range(steps):
        losses, report = method.training_step(next(batches) if step < 5 else first)
        assert all(torch.isfinite(v) for v in losses.values()) and 0 <= report["accuracy"] <= 1
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return start, loss_on_first()


def test_trains_on_synthmemes(synth_shards, synth_clip):
    weights, info, encoder = synth_clip
    torch.manual_seed(0)
    method = tib_va(weights, data=info).train()
    frozen = {k: v.clone() for k, v in method.clip.state_dict().items()}
    batches = iter(train_stream(synth_shards, "train", encoder))
    start, end = fit(method, batches, next(batches))
    assert end < 0.75 * start  # measured 0.52-0.55 x start (float reductions vary a little run to run)
    assert all(torch.equal(v, method.clip.state_dict()[k]) for k, v in frozen.items())


# -- MAMI tasks A and B end to end -----------------------------------------------------------------


def write_mami(root, train: int = 48, test: int = 24):
    """A MAMI-format directory: every label pattern of the types appears (misogynous when any type is
    set, as in MAMI), images in the real layout; Test.csv carries its labels as columns."""
    root.mkdir()
    rows = {"training.csv": [HEADER], "Test.csv": [HEADER]}
    for index in range(train + test):
        types = [(index >> bit) & 1 for bit in range(4)]
        file = f"{1000 + index}.jpg"
        write_image(root / file)
        words = " ".join(name for name, on in zip(("shame", "cliche", "object", "hit"), types) if on)
        row = "\t".join([file, str(int(any(types))), *map(str, types), f"meme {index} {words}"])
        rows["training.csv" if index < train else "Test.csv"].append(row)
    for name, lines in rows.items():
        write_lines(root / name, lines)
    return root


@pytest.fixture
def mami_shards(tmp_path):
    source = write_mami(tmp_path / "mami")
    shards = tmp_path / "mami_shards"
    pack(Mami(str(source)), shards, PackOptions(workers=1), {"input": str(source)})
    return shards


@pytest.mark.slow
def test_tasks_a_and_b_through_the_launcher(mami_shards, tmp_path):
    weights = clip_weights_for(mami_shards, tmp_path / "clip.safetensors", "data=mami")
    run_dir = tmp_path / "tib_va"
    result = run_launcher(
        "train.py", *tiny_run_overrides(mami_shards, run_dir, steps=6), "data=mami_tasks_ab",
        "method=tib_va", "model=clip_small", f"method.clip.weights={weights}",
        "eval.protocols=[classifier,linear_probe]", "eval.tsne=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weighted F1" in result.stdout and "(MAMI task B)" in result.stdout

    results = json.loads((run_dir / "results.json").read_text())
    types = ["shaming", "stereotype", "objectification", "violence"]
    for protocol in ("classifier", "linear_probe"):
        scored = results["protocols"][protocol]
        assert scored["targets"] == ["misogynous", *types]
        task_a = scored["splits"]["test"]
        assert task_a["num_samples"] == 24 and task_a["auroc"] is not None and "f1_weighted" in task_a
        task_b = scored["multilabel"]["test"]
        assert task_b["labels"] == types and list(task_b["per_label"]) == types
        assert {"f1_weighted_macro", "f1_weighted", "f1_macro", "auroc"} <= task_b.keys()
        assert {"auroc", "f1", "precision", "recall"} <= task_b["per_label"]["violence"].keys()
        assert 0 <= task_b["f1_weighted_macro"] <= 1
    with open(run_dir / "predictions" / "classifier_test.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["id", "misogynous_score", "misogynous_prediction", "misogynous"]
    assert rows[0][-1] == "violence" and len(rows) == 25
