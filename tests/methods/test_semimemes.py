"""SemiMemes: the reconstruction loss by hand, frozen CLIP weights loaded from our own file, what each
stage trains, and both stages in one real job that resumes."""

from __future__ import annotations

import json

import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.losses import cross_reconstruction_loss
from memetrain.methods import build_method
from memetrain.methods.base import Stage
from tests.helpers import run_launcher, tiny_run_overrides
from tests.methods.test_clip import DATA, SMALL, meme_batch


def semimemes(weights, **options):
    options = {
        "clip": {"weights": str(weights), "embed_dim": 16},
        "hidden_dim": 8,
        "latent_dim": 4,
        **options,
    }
    return build_method("semimemes", options, SMALL, DATA)


def test_reconstruction_loss_by_hand():
    text, image = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    text_from_image = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # squared errors 1, 0, 0, 0: mean 1/4
    image_from_text = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # squared errors 0, 0, 4, 4: mean 2
    terms = cross_reconstruction_loss(text_from_image, text, image_from_text, image)
    assert terms["image_to_text_mse"].item() == pytest.approx(0.25)
    assert terms["text_to_image_mse"].item() == pytest.approx(2.0)
    assert terms["reconstruction_loss"].item() == pytest.approx(2.25)


def test_frozen_clip_loads_our_weights_and_gives_the_same_features(clip_weights):
    path, reference = clip_weights
    method = semimemes(path)
    for name, value in reference.state_dict().items():
        assert torch.equal(method.clip.state_dict()[name], value), name
    assert not any(p.requires_grad for p in method.clip.parameters())
    batch = meme_batch()
    reference.eval()
    image, text = method.features(batch)
    assert torch.allclose(image, reference.encode_image(batch)) and torch.allclose(
        text, reference.encode_text(batch)
    )
    method.train()
    assert not method.clip.training and method.image_to_text.training  # CLIP stays in eval mode


@pytest.mark.parametrize(
    ("clip_options", "message"),
    [
        ({"embed_dim": 16}, "method.clip.weights"),
        ({"embed_dim": 32, "weights": "WEIGHTS"}, "does not fit"),
        ({"embed_dim": 16, "weights": "WEIGHTS", "bogus": 1}, "unknown option"),
    ],
)
def test_bad_clip_options_are_clear_errors(clip_weights, clip_options, message):
    path, _ = clip_weights
    options = {k: str(path) if v == "WEIGHTS" else v for k, v in clip_options.items()}
    with pytest.raises(ConfigError, match=message):
        build_method("semimemes", {"clip": options}, SMALL, DATA)


def test_each_stage_trains_only_its_part(clip_weights):
    method = semimemes(clip_weights[0], autoencoder_steps=7)
    assert method.stages(50) == [Stage("autoencoders", 7, False), Stage("classifier", 50, True)]
    batch = {**meme_batch(), "labels": torch.tensor([[0], [1], [1], [-1], [0], [1]])}
    autoencoders = [*method.image_to_text.parameters(), *method.text_to_image.parameters()]
    classifier = [*method.hidden.parameters(), *method.output.parameters()]
    for stage, trained, frozen in (
        (method.stages(50)[0], autoencoders, classifier),
        (method.stages(50)[1], classifier, autoencoders),
    ):
        method.start_stage(stage)
        method.zero_grad(set_to_none=True)
        losses, report = method.training_step(batch)
        sum(losses.values()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), stage.name
        assert all(p.grad is None and not p.requires_grad for p in frozen), stage.name
        assert all(p.grad is None for p in method.clip.parameters())
        assert set(losses) == ({"reconstruction_loss"} if stage.name == "autoencoders" else {"cls_loss"})
    assert method.predict(batch).shape == (6, 1) and method.embed(batch).shape == (6, 512)


@pytest.mark.slow
def test_both_stages_run_in_one_job_and_resume(synth_shards, tmp_path):
    clip_dir, run_dir = tmp_path / "clip", tmp_path / "semimemes"
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, clip_dir, steps=6), "method=clip", "model=clip_small",
        "eval=probe", "eval.tsne=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    weights = clip_dir / "checkpoints" / "step_0000006" / "model.safetensors"
    command = [
        *tiny_run_overrides(synth_shards, run_dir, steps=6),
        "method=semimemes",
        "model=clip_small",
        f"method.clip.weights={weights}",
        "method.autoencoder_steps=4",
        "eval.tsne=false",
    ]
    result = run_launcher("train.py", *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "stage autoencoders on train+unlabeled" in result.stderr
        and "stage classifier on train " in result.stderr
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "semimemes" and results["steps"] == 4 + 6
    assert results["protocols"]["classifier"]["splits"]["test"]["auroc"] is not None
    for stage, last in (("autoencoders", 4), ("classifier", 6)):
        assert (
            run_dir / "stages" / stage / "checkpoints" / f"step_{last:07d}" / "model.safetensors"
        ).is_file()
        rows = (run_dir / "stages" / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["step"] == last
    stage_one = [
        json.loads(row) for row in (run_dir / "stages/autoencoders/metrics.jsonl").read_text().splitlines()
    ]
    assert any(
        "train/reconstruction_loss" in row and "train/embedding_std_latent" in row for row in stage_one
    )

    trained = training_record(run_dir)
    again = run_launcher("train.py", *command)  # both stages are complete: resumes, trains nothing
    assert again.returncode == 0, again.stderr[-3000:]
    for stage, last in (("autoencoders", 4), ("classifier", 6)):
        checkpoint = run_dir / "stages" / stage / "checkpoints" / f"step_{last:07d}"
        assert f"resumed from {checkpoint} (step {last})" in again.stderr, again.stderr[-3000:]
    assert training_record(run_dir) == trained, "the re-run trained: a checkpoint or a metrics row changed"
    assert json.loads((run_dir / "results.json").read_text())["protocols"] == results["protocols"]


def training_record(run_dir) -> dict[str, object]:
    """What training leaves in each stage: every checkpoint file's modification time and size, and
    the metrics rows (an evaluation rewrites neither)."""
    record = {}
    for stage in ("autoencoders", "classifier"):
        directory = run_dir / "stages" / stage
        for path in sorted((directory / "checkpoints").rglob("*")):
            if path.is_file():
                stat = path.stat()
                record[str(path.relative_to(run_dir))] = (stat.st_mtime_ns, stat.st_size)
        record[f"{stage}/metrics.jsonl"] = (directory / "metrics.jsonl").read_text()
    return record
