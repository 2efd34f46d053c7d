"""DINO: the loss against a naive loop and by hand, centering (in one process and across two), the
EMA teacher, the schedules, the frozen and weight-normalised last layer, learning on consistent views,
the teacher backbone as fine-tuning weights, config refusals, and one end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from memetrain.errors import ConfigError
from memetrain.losses.dino import DinoLoss
from memetrain.methods import DataInfo, build_method
from memetrain.methods.dino import Dino
from memetrain.models import ImageEncoder, load_weights
from tests.helpers import REPO, free_port, run_launcher, tiny_run_overrides

INFO = DataInfo(["hateful"], "hateful", vocab_size=None)
OPTIONS = dict(
    out_dim=32, hidden_dim=16, bottleneck_dim=8, use_bn_in_head=False, norm_last_layer=True,
    student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, teacher_temp_warmup_steps=10,
    center_momentum=0.9, teacher_momentum=0.996, teacher_momentum_end=1.0, freeze_last_layer_steps=1,
)  # fmt: skip


def dino(backbone: str = "test_resnet", **options) -> Dino:
    torch.manual_seed(0)
    model = {"image": {"name": backbone, "image_size": 32}}
    return build_method("dino", {**OPTIONS, **options}, model, INFO)


def crops(batch: int = 4, local: int = 2) -> dict:
    """2 global 32 px crops and ``local`` 16 px ones, as the multicrop view gives them."""
    generator = torch.Generator().manual_seed(1)
    sizes = [32, 32] + [16] * local
    views = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=generator) for s in sizes]
    return {"views": views, "image": views[0]}


# -- the loss --------------------------------------------------------------------------------------


def naive_dino_loss(student, teacher, center, student_temp, teacher_temp) -> float:
    """Every (global crop i, crop j != i) pair, sample by sample, softmax written out."""
    total, pairs = 0.0, 0
    for i in range(len(teacher)):
        for j in range(len(student)):
            if i == j:
                continue
            pair = 0.0
            for b in range(teacher.shape[1]):
                t = torch.exp((teacher[i, b] - center) / teacher_temp)
                q = t / t.sum()
                s = student[j, b] / student_temp
                log_p = s - torch.log(torch.exp(s).sum())
                pair += -(q * log_p).sum().item()
            total += pair / teacher.shape[1]
            pairs += 1
    return total / pairs


def test_loss_matches_a_naive_loop_over_crop_pairs():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, 11, generator=generator) * 3  # 2 global + 4 local crops, 5 samples
    teacher = torch.randn(2, 5, 11, generator=generator) * 3
    loss = DinoLoss(out_dim=11, student_temp=0.1)
    loss.center.copy_(torch.randn(1, 11, generator=generator))
    expected = naive_dino_loss(student.double(), teacher.double(), loss.center[0].double(), 0.1, 0.05)
    got = loss(list(student), list(teacher), teacher_temp=0.05)["dino_loss"]
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert loss(student, teacher, teacher_temp=0.05)["dino_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_loss_and_entropy_of_a_tiny_case_by_hand():
    # temperatures 1, center 0; teacher crop 0 -> (1/2, 1/2), crop 1 -> (3/4, 1/4); the student the same
    loss = DinoLoss(out_dim=2, student_temp=1.0)
    outputs = torch.tensor([[[0.0, 0.0]], [[math.log(3), 0.0]]])  # [2 crops, 1 sample, 2]
    terms = loss(outputs, outputs, teacher_temp=1.0)
    teacher0_student1 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    teacher1_student0 = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    assert terms["dino_loss"].item() == pytest.approx((teacher0_student1 + teacher1_student0) / 2)
    entropy1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert terms["teacher_entropy"].item() == pytest.approx((math.log(2) + entropy1) / 2)


def test_the_center_is_an_ema_of_the_teacher_mean_and_is_subtracted():
    loss = DinoLoss(out_dim=2, center_momentum=0.9)
    loss.update_center(torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]))  # mean over crops and batch: (2, 3)
    assert loss.center[0].tolist() == pytest.approx([0.2, 0.3])
    loss.update_center([torch.zeros(1, 2), torch.zeros(1, 2)])
    assert loss.center[0].tolist() == pytest.approx([0.18, 0.27])
    # a teacher output equal to the center gives the uniform distribution
    assert loss.teacher_probs(torch.tensor([[0.18, 0.27]]), 0.04)[0].tolist() == pytest.approx([0.5, 0.5])


CENTER_ON_RANK = """
import json, sys, torch, torch.distributed as dist
from memetrain.losses.dino import DinoLoss
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
loss = DinoLoss(out_dim=2, center_momentum=0.5)
loss.update_center(torch.full((2, 3, 2), float(rank)))  # rank 0: zeros, rank 1: ones
print(json.dumps(loss.center[0].tolist()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_the_center_averages_over_ranks_when_distributed():
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", CENTER_ON_RANK, str(rank), port],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    for output in outputs:
        assert json.loads(output) == pytest.approx([0.25, 0.25])  # 0.5 * mean of 0 and 1, on both ranks


# -- the method -------------------------------------------------------------------------------------


def test_the_center_is_checkpointed_with_the_model():
    method = dino()
    method.training_step(crops())
    assert method.loss.center.abs().sum() > 0
    fresh = dino()
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.loss.center, method.loss.center)


def test_the_teacher_is_an_ema_of_the_student():
    method = dino()
    assert all(not p.requires_grad for p in method.teacher.parameters())
    with torch.no_grad():
        for param in method.student.parameters():
            param.add_(torch.randn_like(param))
    teacher = [p.clone() for p in method.teacher.parameters()]
    student = [p.clone() for p in method.student.parameters()]
    method.after_step(step=50, total_steps=100)
    m = 0.998  # halfway along the cosine from 0.996 to 1
    for got, t, s in zip(method.teacher.parameters(), teacher, student):
        torch.testing.assert_close(got, m * t + (1 - m) * s)
    assert all(torch.equal(p, s) for p, s in zip(method.student.parameters(), student))


def fill(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.fill_(value)


def test_an_ema_step_at_momentum_0_996_moves_a_float32_teacher_as_computed_by_hand():
    method = dino(teacher_momentum=0.996, teacher_momentum_end=0.996)
    fill(method.teacher, 1.0)
    fill(method.student, 2.0)
    method.after_step(step=0, total_steps=100)  # 0.996 * 1 + 0.004 * 2
    for param in method.teacher.parameters():
        assert param.dtype == torch.float32
        assert (param - 1.004).abs().max().item() <= 2.5e-7
    method.after_step(step=1, total_steps=100)  # 2 - (2 - 1) * 0.996 ** 2 = 1.007984
    assert all((p - 1.007984).abs().max().item() <= 5e-7 for p in method.teacher.parameters())


def test_a_half_precision_teacher_follows_the_student_through_float32_master_copies():
    # DeepSpeed's fp16 mode halves the whole model. An fp16 teacher updated in place cannot take
    # increments of 0.004 * 0.1 near 1 (its step there is 0.001): it drifts to 1.0977 in 100 steps
    # (a bf16 one stays at 1); the float32 master copies follow 1.1 - 0.1 * 0.996 ** k.
    method = dino(teacher_momentum=0.996, teacher_momentum_end=0.996).half()
    fill(method.teacher, 1.0)
    fill(method.student, 1.1)
    student = torch.tensor(1.1, dtype=torch.float16).item()  # 1.099609375, as the student holds it
    for step in range(100):
        method.after_step(step, total_steps=1000)
    expected = student - (student - 1.0) * 0.996**100  # 1.03302
    for param in method.teacher.parameters():
        assert param.dtype == torch.float16
        assert (param.float() - expected).abs().max().item() <= 1e-3  # within fp16's rounding

    # a loaded checkpoint's teacher is where the average goes on from, not the old master copies
    state = method.state_dict()
    state.update(
        {name: torch.full_like(value, 1.5) for name, value in state.items() if name.startswith("teacher.")}
    )
    method.load_state_dict(state)
    method.after_step(100, total_steps=1000)
    expected = 0.996 * 1.5 + 0.004 * student
    assert all((p.float() - expected).abs().max().item() <= 1e-3 for p in method.teacher.parameters())


def test_momentum_and_teacher_temperature_schedules():
    method = dino()
    assert [method.momentum_at(step, 100) for step in (0, 50, 100, 150)] == pytest.approx(
        [0.996, 0.998, 1.0, 1.0]
    )
    assert [method.teacher_temp_at(step) for step in (0, 5, 10, 60)] == pytest.approx(
        [0.04, 0.055, 0.07, 0.07]
    )
    method.before_step(5, 100)
    _, report = method.training_step(crops())
    assert report["teacher_temp"].item() == pytest.approx(0.055)
    assert report["momentum"].item() == pytest.approx(method.momentum_at(5, 100))
    assert {"teacher_entropy", "embedding_std", "embedding_std_head"} <= report.keys()


def test_the_last_layer_is_frozen_for_the_first_steps_then_trained():
    method = dino(freeze_last_layer_steps=1)
    head = method.student["head"]
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.04), lr=1e-2)

    def step(number: int) -> tuple[torch.Tensor, torch.Tensor]:
        last, hidden = head.last_layer.weight.detach().clone(), head.mlp[0].weight.detach().clone()
        method.before_step(number, 10)
        losses, _ = method.training_step(crops())
        losses["dino_loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        return last, hidden

    last, hidden = step(0)
    torch.testing.assert_close(head.last_layer.weight, last, rtol=0, atol=1e-7)  # frozen
    assert not torch.equal(head.mlp[0].weight, hidden)  # the rest trains
    last, _ = step(1)
    assert (head.last_layer.weight - last).abs().max() > 1e-4  # trained after the first step


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_the_last_layer_is_weight_normalised(norm_last_layer):
    method = dino(norm_last_layer=norm_last_layer)
    last_layer = method.student["head"].last_layer
    scale = last_layer.parametrizations.weight.original0
    assert scale.requires_grad is not norm_last_layer
    norms = last_layer.weight.norm(dim=1)  # [out_dim]: one weight vector per output unit
    torch.testing.assert_close(norms, torch.ones(32))
    if norm_last_layer:  # unit norm whatever the direction becomes
        with torch.no_grad():
            last_layer.parametrizations.weight.original1.mul_(3).add_(1)
        torch.testing.assert_close(last_layer.weight.norm(dim=1), torch.ones(32))


def test_embed_gives_the_teacher_backbone_features_and_vit_takes_local_crops():
    method = dino("test_vit")
    batch = crops(local=2)  # 32 px global and 16 px local crops through one ViT
    losses, report = method.training_step(batch)
    assert torch.isfinite(losses["dino_loss"]) and report["embedding_std"] > 0
    features = method.embed(batch)
    assert features.shape == (4, method.teacher["backbone"].out_dim)
    torch.testing.assert_close(features, method.teacher["backbone"](batch["image"]))
    metrics = method.validation_step(batch)
    assert set(metrics) == {"same_view_loss", "teacher_entropy", "embedding_std"}


def test_dino_learns_to_match_consistent_views_without_collapsing():
    """A fixed batch whose crops agree (noisy copies and a corner): the loss falls far below log K."""
    method = dino(
        out_dim=64, hidden_dim=64, teacher_temp=0.04, teacher_momentum=0.99, teacher_momentum_end=0.99,
        freeze_last_layer_steps=0,
    )  # fmt: skip
    images = crops(batch=16)["image"]
    corner = torch.nn.functional.interpolate(images[:, :, :16, :16].float(), size=16).to(torch.uint8)
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.0), lr=1e-3)
    losses = []
    for step in range(30):
        noisy = [
            (images.int() + torch.randint(-20, 21, images.shape)).clamp(0, 255).to(torch.uint8) for _ in "ab"
        ]
        method.before_step(step, 30)
        terms, report = method.training_step({"views": [*noisy, corner]})
        terms["dino_loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step(step, 30)
        losses.append(terms["dino_loss"].item())
    assert sum(losses[-5:]) / 5 < 0.4 * math.log(64), losses  # log K: the uniform prediction
    assert report["embedding_std_head"] > 0.5 and report["teacher_entropy"] > 0.1


def test_the_teacher_backbone_loads_into_a_supervised_image_encoder(tmp_path):
    method = dino()
    save_file(method.state_dict(), tmp_path / "model.safetensors")
    encoder = ImageEncoder("test_resnet", image_size=32)
    load_weights(encoder, tmp_path / "model.safetensors", prefix="teacher.backbone.")  # strict
    image = crops()["image"]
    torch.testing.assert_close(encoder.eval()(image), method.eval().embed({"image": image}))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"image": {"name": "test_resnet"}, "text": {"kind": "lstm"}}, "model.text is set"),
        ({"image": {"name": "test_resnet"}, "head": {"kind": "linear"}}, "model.head would be unused"),
        ({"text": {"kind": "lstm"}, "image": None}, "model.text is set"),
        ({"image": None}, "DINO needs model.image"),
    ],
)
def test_models_dino_would_misuse_are_refused(model, message):
    with pytest.raises(ConfigError, match=message):
        build_method("dino", OPTIONS, model, INFO)


# -- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_dino_run_trains_without_collapse_and_is_probed(synth_shards, tmp_path):
    run_dir = tmp_path / "dino"
    result = run_launcher(
        "train.py",
        *tiny_run_overrides(synth_shards, run_dir, steps=8),
        "trainer.checkpoint_every=8",  # one checkpoint (student, teacher, center) and one validation
        "trainer.val_every=8",
        "method=dino",
        "model=backbone_resnet18",
        "eval=probe",
        "eval.tsne=false",
        "method.out_dim=256",
        "method.hidden_dim=256",
        "method.view.local_size=16",
        "method.view.local_crops=2",
        "method.teacher_temp_warmup_steps=4",
        "method.freeze_last_layer_steps=2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "dino" and results["steps"] == 8
    for protocol in ("linear_probe", "knn"):
        assert 0 <= results["protocols"][protocol]["splits"]["test"]["auroc"] <= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "train/dino_loss" in row]
    assert len(train) == 4
    assert all(row["train/embedding_std"] > 0.1 for row in train), [r["train/embedding_std"] for r in train]
    assert {
        "train/teacher_temp",
        "train/momentum",
        "train/teacher_entropy",
        "train/embedding_std_head",
    } <= train[0].keys()
    assert train[-1]["train/teacher_temp"] == pytest.approx(0.07)
    assert any("val/same_view_loss" in row for row in rows)
    weights = load_file(str(run_dir / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert weights["loss.center"].abs().sum() > 0
