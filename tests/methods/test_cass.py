"""CASS and CASS-MM: the agreement loss against a hand-computed case and a naive loop, gradients into
every network, the lambda term, config refusals, the Hydra model configs, and end-to-end runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from memetrain.errors import ConfigError
from memetrain.losses.agreement import CassMMLoss, cosine_agreement_loss, variance_hinge
from memetrain.methods import DataInfo, build_method
from tests.helpers import REPO, run_launcher, tiny_run_overrides

INFO = DataInfo(label_names=["hateful"], main_label="hateful", vocab_size=40)
CNN = {"name": "test_resnet", "image_size": 32}  # timm's tiny test models: 96 and 64 features
VIT = {"name": "test_vit", "image_size": 32}
TEXT = {"kind": "transformer", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "dropout": 0.0}
SMALL_HEADS = {"proj_dim": 16, "proj_hidden_dim": 32}


def naive_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 - 2 cos, one pair at a time in plain Python, averaged."""
    total = 0.0
    for x, y in zip(a.tolist(), b.tolist()):
        dot = sum(p * q for p, q in zip(x, y))
        norms = math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y))
        total += 2 - 2 * dot / norms
    return total / len(a)


def naive_variance_hinge(z: torch.Tensor, target: float = 0.5) -> float:
    """VICReg's variance hinge on unit rows, one dimension at a time in plain Python: the unbiased
    std over the batch (1e-4 inside the root) scaled by sqrt(D), hinged at ``target``, averaged."""
    rows = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in z.tolist()]
    n, dims = len(rows), len(rows[0])
    total = 0.0
    for d in range(dims):
        column = [row[d] for row in rows]
        mean = sum(column) / n
        var = sum((v - mean) ** 2 for v in column) / (n - 1)
        total += max(0.0, target - math.sqrt(var + 1e-4) * math.sqrt(dims))
    return total / dims


def memes(size: int = 4) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator),
        "input_ids": torch.randint(5, 40, (size, 6), generator=generator),
        "attention_mask": torch.ones(size, 6, dtype=torch.long),
    }


def cass(**options):
    torch.manual_seed(0)
    return build_method("cass", {**SMALL_HEADS, **options}, {"cnn": CNN, "vit": VIT}, INFO)


def cass_mm(model: dict | None = None, **options):
    torch.manual_seed(0)
    return build_method("cass_mm", {**SMALL_HEADS, **options}, model or {"vit": VIT, "text": TEXT}, INFO)


# -- the loss ------------------------------------------------------------------------------------


def test_agreement_on_a_hand_computed_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    b = torch.tensor([[5.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # cosines 1, 1/sqrt(2), -1 -> terms 0, 2 - sqrt(2), 4
    expected = (0 + (2 - math.sqrt(2)) + 4) / 3
    assert cosine_agreement_loss(a, b).item() == pytest.approx(expected, abs=1e-6)


def test_agreement_matches_a_naive_loop_and_is_symmetric():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 7, 5, generator=generator)
    assert cosine_agreement_loss(a, b).item() == pytest.approx(naive_agreement(a, b), abs=1e-5)
    assert cosine_agreement_loss(a, b).item() == pytest.approx(cosine_agreement_loss(b, a).item(), abs=1e-7)
    assert cosine_agreement_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)


def test_agreement_sends_gradients_to_both_inputs():
    a, b = torch.randn(2, 4, 3).unbind(0)
    a.requires_grad_(True), b.requires_grad_(True)
    cosine_agreement_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_cass_mm_loss_matches_its_definition(weight):
    generator = torch.Generator().manual_seed(2)
    z_cnn, z_vit, z_text = torch.randn(3, 6, 4, generator=generator)
    two = CassMMLoss(weight)([z_cnn, z_vit], z_text)
    cross = (naive_agreement(z_cnn, z_text) + naive_agreement(z_vit, z_text)) / 2
    assert two["cross_modal_loss"].item() == pytest.approx(cross, abs=1e-5)
    assert two["unimodal_loss"].item() == pytest.approx(weight * naive_agreement(z_cnn, z_vit), abs=1e-5)
    one = CassMMLoss(weight)([z_vit], z_text)
    assert one.keys() == {"cross_modal_loss"}
    assert one["cross_modal_loss"].item() == pytest.approx(naive_agreement(z_vit, z_text), abs=1e-5)


# -- the methods ---------------------------------------------------------------------------------


def grad_norms(method) -> dict[str, float]:
    """Total gradient norm per encoder and head; every trainable parameter must have a gradient."""
    norms = {}
    for name, param in method.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        part = ".".join(name.split(".")[:2])  # encoders.cnn, heads.vit ...
        norms[part] = norms.get(part, 0.0) + param.grad.norm().item()
    return norms


def test_variance_hinge_on_hand_computed_cases():
    one_point = torch.tensor([[3.0, 0.0]] * 4)  # normalised: [1, 0] four times; std = sqrt(1e-4)
    assert variance_hinge(one_point).item() == pytest.approx(0.5 - 0.01 * math.sqrt(2), abs=1e-6)
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # var per dim 2/3
    assert variance_hinge(spread).item() == 0.0
    half = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # var 1/3: sqrt(2/3 + 2e-4) < 1
    expected = max(0.0, 1.0 - math.sqrt(2 * (1 / 3 + 1e-4)))
    assert variance_hinge(half, target=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_variance_hinge_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(1, 5, generator=generator) + 0.3 * torch.randn(7, 5, generator=generator)
    expected = naive_variance_hinge(z)
    assert expected > 0 and variance_hinge(z).item() == pytest.approx(expected, abs=1e-6)
    valid = torch.tensor([True, False, True, True, False, True, True])
    assert variance_hinge(z, valid=valid).item() == pytest.approx(naive_variance_hinge(z[valid]), abs=1e-6)
    spread = torch.randn(64, 5, generator=generator)
    assert variance_hinge(spread, target=1.5).item() == pytest.approx(
        naive_variance_hinge(spread, target=1.5), abs=1e-6
    )


def test_the_variance_term_is_weighted_and_off_at_zero():
    method, batch = cass(variance_weight=0.5), memes()
    losses, _ = method.training_step(batch)
    z = {b: method.heads[b](method.encoders[b](batch["image"])).detach() for b in ("cnn", "vit")}
    expected = 0.5 * (naive_variance_hinge(z["cnn"]) + naive_variance_hinge(z["vit"])) / 2
    assert expected > 0, "a case where the hinge is active"
    assert losses["variance_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert cass(variance_weight=0.0).training_step(batch)[0].keys() == {"agreement_loss"}
    mm = CassMMLoss(variance_weight=2.0)
    generator = torch.Generator().manual_seed(3)
    close = torch.randn(3, 1, 8, generator=generator) + 0.2 * torch.randn(3, 6, 8, generator=generator)
    images, text = [close[0]], close[1]  # rows near one point each: the hinge is active
    terms = mm(images, text)
    expected = 2.0 * (naive_variance_hinge(images[0]) + naive_variance_hinge(text)) / 2
    assert expected > 0 and terms["variance_loss"].item() == pytest.approx(expected, abs=1e-6)


def test_cass_trains_both_networks_on_one_view():
    method = cass()
    losses, report = method.training_step(memes())
    assert losses.keys() == {"agreement_loss", "variance_loss"} and 0 < losses["agreement_loss"].item() < 4
    assert report.keys() == {"embedding_std_cnn", "embedding_std_vit"}
    sum(losses.values()).backward()
    norms = grad_norms(method)
    assert norms.keys() == {"encoders.cnn", "encoders.vit", "heads.cnn", "heads.vit"}
    assert all(value > 0 for value in norms.values()), norms


def test_cass_loss_is_the_agreement_of_the_two_projections():
    method, batch = cass(), memes()
    losses, _ = method.training_step(batch)
    z = {b: method.heads[b](method.encoders[b](batch["image"])) for b in ("cnn", "vit")}
    assert losses["agreement_loss"].item() == pytest.approx(
        naive_agreement(z["cnn"].detach(), z["vit"].detach()), abs=1e-5
    )


@pytest.mark.parametrize(("embed_from", "dim"), [("cnn", 96), ("vit", 64), ("both", 96 + 64)])
def test_cass_embeds_the_network_it_is_told(embed_from, dim):
    method, batch = cass(embed_from=embed_from).eval(), memes()
    with torch.no_grad():
        features = method.embed(batch)
        assert features.shape == (4, dim)
        if embed_from != "both":
            assert torch.equal(features, method.encoders[embed_from](batch["image"]))
        else:
            assert torch.allclose(features.norm(dim=1), torch.full((4,), math.sqrt(2)))


def test_cass_mm_lambda_zero_is_the_cross_modal_term_alone():
    model = {"cnn": CNN, "vit": VIT, "text": TEXT}
    plain, weighted, batch = cass_mm(model), cass_mm(model, unimodal_weight=0.5), memes()
    weighted.load_state_dict(plain.state_dict())
    lp, report = plain.training_step(batch)
    lw, _ = weighted.training_step(batch)
    assert report.keys() == {"embedding_std_cnn", "embedding_std_vit", "embedding_std_text"}
    assert lp["unimodal_loss"].item() == 0.0
    assert lp["cross_modal_loss"].item() == pytest.approx(lw["cross_modal_loss"].item(), abs=1e-6)
    z = {b: plain.heads[b](plain.encoders[b](batch["image"])).detach() for b in ("cnn", "vit")}
    assert lw["unimodal_loss"].item() == pytest.approx(0.5 * naive_agreement(z["cnn"], z["vit"]), abs=1e-5)
    sum(lp.values()).backward()
    assert all(value > 0 for value in grad_norms(plain).values())  # CNN and ViT learn through the text


def test_cass_mm_with_one_image_branch_trains_image_and_text():
    method = cass_mm()
    losses, report = method.training_step(memes())
    assert losses.keys() == {"cross_modal_loss", "variance_loss"}
    assert report.keys() == {"embedding_std_vit", "embedding_std_text"}
    sum(losses.values()).backward()
    norms = grad_norms(method)
    assert norms.keys() == {"encoders.vit", "encoders.text", "heads.vit", "heads.text"}
    assert all(value > 0 for value in norms.values()), norms


@pytest.mark.parametrize(("embed_from", "dim"), [("image", 96 + 64), ("text", 32), ("both", 96 + 64 + 32)])
def test_cass_mm_embeds_image_text_or_both(embed_from, dim):
    method = cass_mm({"cnn": CNN, "vit": VIT, "text": TEXT}, embed_from=embed_from).eval()
    with torch.no_grad():
        assert method.embed(memes()).shape == (4, dim)


@pytest.mark.parametrize(
    ("method", "model", "options", "message"),
    [
        (
            "cass",
            {"image": CNN, "head": {"kind": "linear"}, "text": None},
            {},
            "model.head is not used by cass",
        ),
        ("cass", {"image": CNN}, {}, "cass needs model.cnn; cass needs model.vit"),
        ("cass", {"cnn": CNN, "vit": VIT, "text": TEXT}, {}, "model.text is not used by cass"),
        ("cass", {"cnn": VIT, "vit": VIT}, {}, "model.cnn.name='test_vit' must be a convolutional network"),
        ("cass", {"cnn": CNN, "vit": CNN}, {}, "model.vit.name='test_resnet' must be a vision transformer"),
        ("cass", {"cnn": CNN, "vit": VIT}, {"embed_from": "text"}, "method.embed_from='text'"),
        ("cass", {"cnn": CNN, "vit": VIT}, {"temperature": 0.1}, "unknown option(s) ['temperature']"),
        ("cass_mm", {"vit": VIT}, {}, "cass_mm needs model.text"),
        ("cass_mm", {"text": TEXT}, {}, "cass_mm needs an image branch"),
        ("cass_mm", {"vit": VIT, "text": TEXT, "head": {"kind": "concat"}}, {}, "model.head is not used"),
        ("cass_mm", {"vit": VIT, "text": TEXT}, {"unimodal_weight": 0.5}, "> 0 only with both model.cnn"),
        ("cass_mm", {"cnn": CNN, "vit": VIT, "text": TEXT}, {"unimodal_weight": -1.0}, "must be >= 0"),
        ("cass_mm", {"vit": VIT, "text": TEXT}, {"embed_from": "cnn"}, "method.embed_from='cnn'"),
    ],
)
def test_unusable_configs_are_refused(method, model, options, message):
    with pytest.raises(ConfigError) as error:
        build_method(method, {**SMALL_HEADS, **options}, model, INFO)
    assert message in str(error.value)


@pytest.mark.parametrize("build", [cass, cass_mm])
def test_a_multi_view_stream_is_refused(build):
    batch = memes()
    batch["views"] = [batch.pop("image")] * 2
    with pytest.raises(ConfigError, match="method.view.name=assignment"):
        build().training_step(batch)


@pytest.mark.parametrize(
    ("overrides", "branches"),
    [
        (["method=cass", "model=cass_small"], {"cnn": "resnet18", "vit": "vit_tiny_patch16_224"}),
        (["method=cass", "model=cass_base"], {"cnn": "resnet50", "vit": "vit_base_patch16_224"}),
        (["method=cass_mm", "model=cass_mm_small"], {"vit": "vit_tiny_patch16_224", "text": None}),
        (
            ["method=cass_mm", "model=cass_mm_small", "model/image@model.cnn=resnet18"],
            {"cnn": "resnet18", "vit": "vit_tiny_patch16_224", "text": None},
        ),
        (
            [
                "method=cass_mm",
                "model=cass_mm_base",
                "~model/image@model.vit",
                "model/image@model.cnn=resnet50",
            ],
            {"cnn": "resnet50", "text": None},
        ),
    ],
)
def test_model_configs_compose_to_the_branches(overrides, branches):
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", overrides)
    assert set(cfg.model) == set(branches)
    for branch, name in branches.items():
        assert cfg.model[branch].get("name") == name
    assert cfg.method.view.name == "assignment"


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "branches"),
    [
        (["method=cass", "model=cass_small"], ("cnn", "vit")),
        (["method=cass_mm", "model=cass_mm_small"], ("vit", "text")),
    ],
)
def test_tiny_runs_end_with_probe_metrics_and_spread_embeddings(synth_shards, tmp_path, overrides, branches):
    run_dir = tmp_path / "run"
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, run_dir), *overrides, "eval=probe", "eval.tsne=false"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    for protocol in ("linear_probe", "knn"):
        for split in ("dev", "test"):
            metrics = results["protocols"][protocol]["splits"][split]
            assert 0 <= metrics["auroc"] <= 1 and metrics["num_samples"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "train/loss" in row][-1]
    assert last["step"] == 12
    for branch in branches:
        assert last[f"train/embedding_std_{branch}"] > 0.1, last
