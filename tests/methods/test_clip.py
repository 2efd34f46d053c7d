"""CLIP: the loss by hand and against a naive reference, the learned temperature, the method's
contract, the gather across two real processes, real open_clip state dicts from a local file,
and one pretraining run end to end."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from memetrain.errors import ConfigError
from memetrain.losses.contrastive import ClipLoss, gather_with_grad
from memetrain.methods import DataInfo, build_method
from tests.helpers import run_launcher, tiny_run_overrides, torchrun

DATA = DataInfo(label_names=["hateful"], main_label="hateful", vocab_size=50)
SMALL = {
    "image": {"name": "resnet18"},
    "text": {"kind": "transformer", "vocab_size": None, "hidden_size": 32, "num_layers": 1, "num_heads": 2},
}
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def clip(model=None, **options):
    return build_method("clip", options, SMALL if model is None else model, DATA)


def meme_batch(size: int = 6, image_size: int = 32, length: int = 8) -> dict:
    g = torch.Generator().manual_seed(size)
    return {
        "image": torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=g),
        "input_ids": torch.randint(1, DATA.vocab_size, (size, length), generator=g),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "text": [f"KEEP THE ROUND ONES OUT {size - i} RED ONES" for i in range(size)],
        "valid": torch.ones(size, dtype=torch.bool),
    }


def unit(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


# -- the loss ------------------------------------------------------------------------------------


def test_clip_loss_matches_a_hand_computed_3x3_case():
    # images at 0, 60, 120 degrees, texts at 180, 0, 300 degrees: cosines S[i][j] =
    #   [[-1, 1, 1/2], [-1/2, 1/2, -1/2], [1/2, -1/2, -1]];  at scale ln 4, exp(logits) = 4 ** S =
    #   [[1/4, 4, 2], [1/2, 2, 1/2], [2, 1/2, 1/4]]
    # image -> text (rows, label i):    p = (1/4)/(25/4) = 1/25,  2/3,  (1/4)/(11/4) = 1/11
    # text -> image (columns, label j): p = (1/4)/(11/4) = 1/11,  2/(13/2) = 4/13,  (1/4)/(11/4) = 1/11
    # loss = (mean of -ln p over rows + mean over columns) / 2 = (ln(25 * 3/2 * 11) + ln(11 * 13/4 * 11)) / 6
    terms = ClipLoss()(unit([0, 60, 120]), unit([180, 0, 300]), torch.tensor(math.log(4)))
    expected = (math.log(25 * 1.5 * 11) + math.log(11 * 13 / 4 * 11)) / 6
    assert terms["contrastive_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["i2t_top1"].item() == pytest.approx(1 / 3)  # rows argmax: 1, 1, 0: only row 1 right
    assert terms["t2i_top1"].item() == 0.0  # columns argmax: 2, 0, 0


def naive_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy of each image over all texts and each text over all images, one pair at a time."""
    n = len(images)
    total = images.new_zeros(())
    for i in range(n):
        image_row = torch.stack([scale * torch.dot(images[i], texts[j]) for j in range(n)])
        text_row = torch.stack([scale * torch.dot(texts[i], images[j]) for j in range(n)])
        total = total - torch.log(torch.exp(image_row[i]) / torch.exp(image_row).sum())
        total = total - torch.log(torch.exp(text_row[i]) / torch.exp(text_row).sum())
    return total / (2 * n)


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_matches_a_naive_reference_in_value_and_gradient(local_loss):
    torch.manual_seed(0)
    images = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1).requires_grad_()
    texts = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1).requires_grad_()
    terms = ClipLoss(local_loss)(images, texts, torch.tensor(12.5))
    grads = torch.autograd.grad(terms["contrastive_loss"], (images, texts))
    reference = naive_clip_loss(images, texts, 12.5)
    expected = torch.autograd.grad(reference, (images, texts))
    assert terms["contrastive_loss"].item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    similarity = images @ texts.T
    expected_i2t = (similarity.argmax(dim=1) == torch.arange(7)).double().mean().item()
    assert terms["i2t_top1"].item() == pytest.approx(expected_i2t)


def test_one_process_gathers_nothing():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# -- the method ----------------------------------------------------------------------------------


def test_logit_scale_starts_at_one_over_0_07_is_clamped_at_100_and_stays_learnable():
    method = clip(max_logit_scale=100.0)
    assert method.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        method.model.logit_scale.fill_(math.log(1000.0))
    assert method.logit_scale().item() == pytest.approx(100.0)
    _, report = method.training_step(meme_batch())
    assert report["logit_scale"].item() == pytest.approx(100.0)
    method.after_step(0, 10)  # the parameter itself is clamped after the optimizer step
    assert method.model.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        method.model.logit_scale.fill_(-1.0)
    method.after_step(1, 10)
    assert method.logit_scale().item() == pytest.approx(1.0)


def test_training_step_terms_reach_every_parameter_and_embed_has_the_chosen_modalities():
    method = clip(embed_dim=8)
    losses, report = method.training_step(meme_batch())
    assert set(losses) == {"contrastive_loss"}
    assert {"i2t_top1", "t2i_top1", "logit_scale", "embedding_std_image", "embedding_std_text"} <= set(report)
    assert all(name.startswith("embedding_std") for name in report if "std" in name)
    losses["contrastive_loss"].backward()
    unused = [name for name, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP needs every parameter in the graph
    assert method.embed(meme_batch(size=4)).shape == (4, 16)
    for embed in ("image", "text"):
        features = clip(embed_dim=8, embed=embed).embed(meme_batch(size=4))
        assert features.shape == (4, 8)
        torch.testing.assert_close(features.norm(dim=1), torch.ones(4))
    assert not method.classifies


def test_validation_drops_padding():
    method = clip(embed_dim=8).eval()
    batch = meme_batch(size=6)
    batch["valid"][4:] = False
    real = {k: v[:4] for k, v in meme_batch(size=6).items()}
    got, want = method.validation_step(batch), method.validation_step(real)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name])
    batch["valid"][:] = False  # a batch of padding only: finite values (weighted 0 by the trainer)
    assert all(torch.isfinite(value) for value in method.validation_step(batch).values())


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ({**SMALL, "head": {"kind": "concat"}}, {}, "not a classifier head"),
        ({"image": SMALL["image"]}, {}, "needs both model.image and model.text"),
        (SMALL, {"tower": "openai"}, "method.tower='openai'"),
        (SMALL, {"embed": "fused"}, "method.embed='fused'"),
        (SMALL, {"init_logit_scale": 200.0}, "must be in [1, max_logit_scale=100.0]"),
        (SMALL, {"open_clip_model": "ViT-B-32"}, "need method.tower=open_clip"),
        (SMALL, {"tower": "open_clip", "open_clip_model": "ViT-B-32"}, "use model=clip_open_clip"),
        ({}, {"tower": "open_clip"}, "needs method.open_clip_model"),
        ({}, {"tower": "open_clip", "open_clip_model": "ViT-B-33"}, "close matches: ViT-B-32"),
        ({}, {"tower": "open_clip", "open_clip_model": "ViT-B-16-SigLIP"}, "not a plain CLIP"),
        (
            {},
            {"tower": "open_clip", "open_clip_model": "ViT-B-32", "open_clip_weights": "/no/w.pt"},
            "not found",
        ),
    ],
)
def test_bad_configs_are_refused_with_the_fix(model, options, message, offline):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        clip(model, **options)


# -- open_clip towers: real state dicts from a local file ----------------------------------------


@pytest.fixture
def tiny_open_clip(tmp_path):
    """A tiny open_clip CLIP architecture registered as ``memetrain-tiny``, and a source model of it."""
    import open_clip

    config = tmp_path / "memetrain-tiny.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    source = open_clip.create_model("memetrain-tiny", init_logit_scale=math.log(50.0))
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name != "logit_scale":
                param.add_(torch.randn_like(param))  # nothing left at its default initialisation
    return source


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_weights_load_from_a_local_file_tensor_for_tensor(
    tiny_open_clip, tmp_path, suffix, offline
):
    state = {name: value.contiguous() for name, value in tiny_open_clip.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    method = clip(
        {"image": None, "text": None},
        tower="open_clip",
        open_clip_model="memetrain-tiny",
        open_clip_weights=str(path),
        open_clip_image_size=32,
    )
    loaded = method.model.clip.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    assert method.logit_scale().item() == pytest.approx(50.0)
    losses, report = method.training_step(meme_batch(size=4))  # captions tokenised by open_clip's BPE
    assert torch.isfinite(losses["contrastive_loss"]) and report["logit_scale"].item() == pytest.approx(50.0)
    assert method.embed(meme_batch(size=4)).shape == (4, 2 * TINY_OPEN_CLIP["embed_dim"])


def test_open_clip_weights_of_another_architecture_are_refused(tiny_open_clip, tmp_path, offline):
    state = {name: value for name, value in tiny_open_clip.state_dict().items() if name != "text_projection"}
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "other.safetensors"
    save_file({name: value.contiguous() for name, value in state.items()}, path)
    options = dict(tower="open_clip", open_clip_model="memetrain-tiny", open_clip_weights=str(path))
    with pytest.raises(ConfigError, match="1 missing \\(text_projection\\), 1 unexpected \\(extra.weight\\)"):
        clip({"image": None, "text": None}, open_clip_image_size=32, **options)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be loaded into memetrain-tiny"):
        clip({"image": None, "text": None}, open_clip_image_size=32, **options)


# -- across processes and end to end -------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    script = Path(__file__).with_name("clip_gather_script.py")
    result = subprocess.run(
        [*torchrun(2), str(script), str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for local_loss, result in results.items():
            ranks, whole = result["ranks"], result["one_process"]
            torch.testing.assert_close(ranks["loss"], whole["loss"])
            torch.testing.assert_close(ranks["i2t_top1"], whole["i2t_top1"])
            assert ranks["grads"].keys() == whole["grads"].keys()
            for name, grad in whole["grads"].items():
                torch.testing.assert_close(
                    ranks["grads"][name], grad, msg=f"{name} (local_loss={local_loss})"
                )


@pytest.mark.slow
def test_clip_pretrains_end_to_end_and_is_probed(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*tiny_run_overrides(synth_shards, run_dir), "method=clip", "model=clip_small", "eval=probe"]
    result = run_launcher("train.py", *overrides, "eval.tsne=false")
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "clip" and results["steps"] == 12
    for protocol in ("linear_probe", "knn"):
        assert results["protocols"][protocol]["splits"]["dev"]["auroc"] is not None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "train/embedding_std_image" in row][-1]
    assert last["step"] == 12 and last["train/embedding_std_image"] > 0.1  # no collapse
    assert last["train/embedding_std_text"] > 0.1
    validation = [row for row in rows if "val/i2t_top1" in row]
    assert [row["step"] for row in validation] == [6, 12]
    assert 0.0 <= validation[-1]["val/i2t_top1"] <= 1.0 and "val/contrastive_loss" in validation[-1]
