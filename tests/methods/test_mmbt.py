"""MMBT: the image-and-text sequence by hand, padding, both modalities reaching the logits and the
gradients reaching both encoders, a local BERT directory loaded through the method, our own weights
through init, config refusals, and one run end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, build_method
from tests.helpers import REPO, run_launcher, tiny_run_overrides

DATA = DataInfo(label_names=["hateful", "harmful"], main_label="hateful", vocab_size=50)
IMAGE = {"name": "test_resnet"}  # timm's tiny ResNet: a 2 x 2 feature map of 96 channels at 64 px
TEXT = {"kind": "transformer", "vocab_size": None, "hidden_size": 32, "num_layers": 1, "num_heads": 2}
CLS, SEP, PAD = 2, 3, 0  # the packed WordPiece tokenizer's ids


def mmbt(model=None, **options):
    torch.manual_seed(0)
    return build_method("mmbt", options, model or {"image": IMAGE, "text": TEXT}, DATA)


def meme_batch(texts: list[list[int]], width: int = 6, seed: int = 0) -> dict:
    """64 px random images and ``[CLS] text [SEP]`` right-padded with [PAD] to ``width``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(texts), width), PAD)
    for row, text in enumerate(texts):
        ids[row, : len(text) + 2] = torch.tensor([CLS, *text, SEP])
    return {
        "image": torch.randint(0, 256, (len(texts), 3, 64, 64), dtype=torch.uint8, generator=g),
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
        "labels": torch.tensor([[1, 0], [0, -1], [1, 1]])[: len(texts)],
    }


# -- the sequence --------------------------------------------------------------------------------


def test_the_sequence_is_cls_image_tokens_sep_then_the_text_with_its_own_segment_and_positions():
    method = mmbt(num_image_tokens=3).eval()
    batch = meme_batch([[10, 11], [12]])  # ids [2 10 11 3 0 0] and [2 12 3 0 0 0]
    sequence = method.sequence(batch)
    words = method.text_encoder.input_embeddings().weight
    assert sequence.embeds.shape == (2, 3 + 2 + 5, 32)
    torch.testing.assert_close(sequence.embeds[:, 0], words[[CLS, CLS]])
    torch.testing.assert_close(sequence.embeds[:, 4], words[[SEP, SEP]])  # the text's closing [SEP]
    torch.testing.assert_close(sequence.embeds[0, 5:], words[[10, 11, SEP, PAD, PAD]])
    torch.testing.assert_close(sequence.embeds[1, 5:], words[[12, SEP, PAD, PAD, PAD]])
    # 3 bands of a 2-row feature map (adaptive pooling): the top row, both rows, the bottom row
    with torch.no_grad():
        features = method.image_encoder.feature_map(batch["image"])  # [2, 96, 2, 2]
        bands = [features[:, :, 0].mean(-1), features.mean((2, 3)), features[:, :, 1].mean(-1)]
        expected = method.image_projection(torch.stack(bands, dim=1))  # [2, 3, 32]
    torch.testing.assert_close(sequence.embeds[:, 1:4], expected)
    assert sequence.segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]] * 2
    assert sequence.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2
    assert sequence.mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]]


def test_padding_never_changes_the_output():
    method = mmbt().eval()
    batch = meme_batch([[10, 11], [12], [13, 14, 15, 16]])
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [3, 6]
    padded_ids = torch.randint(5, 50, (3, 12))  # 6 more columns, and padding holds words, not [PAD]
    padded_ids[:, :6] = torch.where(mask.bool(), ids, padded_ids[:, :6])
    padded_mask = torch.cat([mask, torch.zeros_like(mask)], dim=1)
    padded = {**batch, "input_ids": padded_ids, "attention_mask": padded_mask}
    with torch.no_grad():
        torch.testing.assert_close(method.predict(padded), method.predict(batch), rtol=1e-5, atol=1e-5)


def test_the_image_and_the_text_both_change_the_logits():
    method = mmbt().eval()
    batch = {**meme_batch([[10, 11], [12]]), "image": torch.zeros(2, 3, 64, 64, dtype=torch.uint8)}
    white = {**batch, "image": torch.full_like(batch["image"], 255)}
    other_texts = {**batch, "input_ids": meme_batch([[20, 21], [22]])["input_ids"]}
    with torch.no_grad():
        logits = method.predict(batch)
        # at initialisation the effects are small (BERT's 0.02 init), but far above float32 rounding
        assert ((method.predict(white) - logits).abs() > 1e-5).all()
        assert ((method.predict(other_texts) - logits).abs() > 1e-5).all()


def test_gradients_reach_every_parameter_of_both_encoders():
    method = mmbt()
    losses, report = method.training_step(meme_batch([[10, 11], [12], [13]]))
    assert set(losses) == {"cls_loss"} and set(report) == {"accuracy"}
    losses["cls_loss"].backward()
    unused = [name for name, p in method.named_parameters() if p.grad is None]
    assert unused == []  # DDP needs every parameter in the graph
    for encoder in (method.image_encoder, method.text_encoder):
        assert sum(p.grad.abs().sum() for p in encoder.parameters()) > 0


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_predict_embed_and_the_loss_on_the_chosen_targets(loss):
    method = mmbt(targets=["hateful", "harmful"], loss=loss, focal_gamma=0.0).eval()
    batch = meme_batch([[10, 11], [12], [13]])  # the second meme has no harmful label (-1)
    logits = method.predict(batch)
    assert method.classifies and method.needs_labels and logits.shape == (3, 2)
    embedding = method.embed(batch)
    assert embedding.shape == (3, 32)
    torch.testing.assert_close(method.output(embedding), logits)  # the [CLS] state, then the output layer
    labeled = batch["labels"] >= 0
    bce = F.binary_cross_entropy_with_logits(logits, batch["labels"].clamp(min=0).float(), reduction="none")
    weights = 1.0 if loss == "bce" else torch.where(batch["labels"] == 1, 0.25, 0.75)  # focal's alpha
    expected = (bce * weights)[labeled].mean()  # gamma 0: focal is alpha-weighted cross-entropy
    losses, _ = method.training_step(batch)
    torch.testing.assert_close(losses["cls_loss"], expected)


# -- weights -------------------------------------------------------------------------------------


def test_a_local_bert_directory_loads_through_the_method_tensor_for_tensor(tmp_path, offline):
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40,
    )  # fmt: skip
    torch.manual_seed(1)
    source = BertModel(config)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param))  # nothing left at its default initialisation
    source.save_pretrained(tmp_path / "bert")
    method = mmbt({"image": IMAGE, "text": {"kind": "transformer", "pretrained": str(tmp_path / "bert")}})
    loaded = method.text_encoder.model.state_dict()
    expected = {name: value for name, value in source.state_dict().items() if not name.startswith("pooler.")}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert method.max_positions == 40
    losses, _ = method.training_step(meme_batch([[10, 11], [12]]))
    assert torch.isfinite(losses["cls_loss"])


def test_a_transformer_without_a_second_segment_is_refused(tmp_path, offline):
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        type_vocab_size=1,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="type_vocab_size >= 2"):
        mmbt({"image": IMAGE, "text": {"kind": "transformer", "pretrained": str(tmp_path / "bert")}})


def test_our_own_weights_in_method_init(tmp_path):
    trained = mmbt()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "model.safetensors")
    path = str(tmp_path / "model.safetensors")
    init = {
        "image": {"path": path, "prefix": "image_encoder."},
        "text": {"path": path, "prefix": "text_encoder."},
    }
    torch.manual_seed(3)
    fresh = build_method("mmbt", {"init": init}, {"image": IMAGE, "text": TEXT}, DATA)
    for part in ("image_encoder", "text_encoder"):
        ours, theirs = getattr(fresh, part).state_dict(), getattr(trained, part).state_dict()
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert not torch.equal(fresh.output.weight, trained.output.weight)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ({"image": IMAGE, "text": TEXT, "head": {"kind": "concat"}}, {}, "own output layer"),
        ({"text": TEXT}, {}, "needs model.image"),
        ({"image": IMAGE, "text": {"kind": "lstm", "vocab_size": None}}, {}, "kind transformer, not lstm"),
        ({"image": IMAGE}, {}, "kind transformer, not None"),
        (None, {"num_image_tokens": 0}, "at least 1"),
        (None, {"num_image_tokens": 511}, "need 513 positions, but .* max_position_embeddings=512"),
        (None, {"targets": ["offensive"]}, "not labels of this data"),
        (None, {"loss": "mse"}, "choose bce or focal"),
        (None, {"init": {"head": {"path": "x", "prefix": ""}}}, "has no head encoder"),
    ],
)
def test_unusable_configs_are_refused_with_the_fix(model, options, message):
    with pytest.raises(ConfigError, match=message):
        mmbt(model, **options)


def test_texts_longer_than_the_position_table_are_refused_by_name():
    method = mmbt({"image": IMAGE, "text": {**TEXT, "max_position_embeddings": 8}}).eval()
    with torch.no_grad():
        method.predict(meme_batch([[10] * 7], width=9))  # [CLS] moves out: 8 text positions, 0..7
        with pytest.raises(ConfigError, match="lower data.max_length"):
            method.predict(meme_batch([[10] * 8], width=10))


def test_the_model_config_composes_to_image_and_transformer_without_a_head():
    with initialize_config_dir(str(REPO / "configs"), version_base=None):
        cfg = compose("train", ["method=mmbt", "model=mmbt_small"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert set(model) == {"image", "text"}
    assert model["image"]["name"] == "resnet18" and model["text"]["kind"] == "transformer"
    options = OmegaConf.to_container(cfg.method, resolve=True)
    assert options.pop("name") == "mmbt" and options.pop("view")["name"] == "resize"
    method = build_method("mmbt", options, model, DATA)
    assert method.num_image_tokens == 3 and method.image_projection.in_features == 512


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_mmbt_run_ends_with_test_auroc(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_run_overrides(synth_shards, run_dir),
        "method=mmbt",
        "model=mmbt_small",
        "eval.tsne=false",
    ]
    result = run_launcher("train.py", *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "mmbt" and results["steps"] == 12 and results["skipped_steps"] == 0
    test = results["protocols"]["classifier"]["splits"]["test"]
    assert 0.0 <= test["auroc"] <= 1.0 and test["num_samples"] > 0
