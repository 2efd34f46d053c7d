"""timm towers by name: weights from a Hugging Face cache laid out by huggingface_hub (written here
by timm's own save_for_hf), read offline through timm's hub code, strictly, with the weights'
own statistics; the one error line when the cache lacks them; provenance records."""

from __future__ import annotations

import hashlib

import pytest
import torch

from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, build_method
from memetrain.models import ImageEncoder
from memetrain.models.hub import image_preprocessing, pretrained_weights, resize_interpolation
from memetrain.models.weights import structure_only
from tests.hub.hub_cache import put_repo, put_timm

INFO = DataInfo(["hateful"], "hateful", vocab_size=50)


def same_backbone(encoder: ImageEncoder, source: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Every tensor of the encoder's backbone is the source's (which still has its classifier)."""
    theirs = source.state_dict()
    ours = encoder.model.state_dict()
    assert set(ours) <= set(theirs)
    assert set(theirs) - set(ours) <= {"head.weight", "head.bias", "fc.weight", "fc.bias"}
    for name, value in ours.items():
        if name not in skip:
            assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize(
    "pretrained", [True, "r160_in1k", "test_vit.r160_in1k", "hf-hub:timm/test_vit.r160_in1k"]
)
def test_each_way_of_naming_the_weights_loads_them_from_the_cache(hub, pretrained):
    source = put_timm(hub.cache, "test_vit.r160_in1k", seed=3)
    encoder = ImageEncoder("test_vit", image_size=160, pretrained=pretrained)
    same_backbone(encoder, source)
    assert encoder.data_config["input_size"] == (3, 160, 160)
    assert encoder.data_config["interpolation"] == "bicubic"


def test_another_image_size_resamples_the_position_embeddings_only(hub):
    source = put_timm(hub.cache, "test_vit.r160_in1k", seed=3)
    encoder = ImageEncoder("test_vit", image_size=32, pretrained=True)
    same_backbone(encoder, source, skip=("pos_embed",))
    assert encoder.model.pos_embed.shape[1] == 1 + 2 * 2  # the class token and a 2 x 2 grid of 16 px patches
    assert encoder(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, encoder.out_dim)


def test_each_tower_is_normalised_with_its_own_weights_statistics(hub):
    # test_efficientnet's weights were trained on ImageNet statistics, test_vit's on 0.5 / 0.5
    put_timm(hub.cache, "test_efficientnet.r160_in1k")
    put_timm(hub.cache, "test_vit.r160_in1k")
    model = {
        "cnn": {"name": "test_efficientnet", "image_size": 32, "pretrained": True},
        "vit": {"name": "test_vit", "image_size": 32, "pretrained": True},
    }
    method = build_method("cass", {"embed_from": "both"}, model, INFO)
    cnn, vit = method.encoders["cnn"].normalize, method.encoders["vit"].normalize
    imagenet_mean, imagenet_std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(cnn.shift.flatten(), imagenet_mean / imagenet_std)
    torch.testing.assert_close(cnn.scale.flatten(), 1 / (255 * imagenet_std))
    torch.testing.assert_close(vit.shift.flatten(), torch.ones(3))
    torch.testing.assert_close(vit.scale.flatten(), torch.full((3,), 1 / (255 * 0.5)))
    expected = {"encoders.cnn": (0.485, 0.456, 0.406), "encoders.vit": (0.5, 0.5, 0.5)}
    assert {tower: config["mean"] for tower, config in image_preprocessing(method).items()} == expected


def test_the_run_records_the_file_it_started_from(hub):
    put_timm(hub.cache, "test_resnet.r160_in1k", seed=4)
    model = {
        "image": {"name": "test_resnet", "image_size": 32, "pretrained": True},
        "text": None,
        "head": {"kind": "linear"},
    }
    method = build_method("supervised", {}, model, INFO)
    (record,) = pretrained_weights(method)
    blob = (hub.cache / "models--timm--test_resnet.r160_in1k" / "blobs").iterdir().__next__()
    assert record["tower"] == "model.image_encoder"
    assert (record["source"], record["name"], record["tag"]) == ("timm", "test_resnet", "r160_in1k")
    assert record["file"].endswith("/snapshots/" + record["revision"] + "/model.safetensors")
    assert record["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert method.model.image_encoder.data_config["interpolation"] == "bilinear"  # test_resnet's own


def test_weights_loaded_over_a_tower_replace_its_record(hub, tmp_path):
    from safetensors.torch import save_file

    put_timm(hub.cache, "test_resnet.r160_in1k", seed=4)
    model = {"image": {"name": "test_resnet", "image_size": 32, "pretrained": True}, "text": None}
    model["head"] = {"kind": "linear"}
    first = build_method("supervised", {}, model, INFO)
    state = {f"model.{k}": v.contiguous() for k, v in first.model.image_encoder.state_dict().items()}
    save_file(state, tmp_path / "run.safetensors")
    init = {"image": {"path": str(tmp_path / "run.safetensors"), "prefix": "model."}}
    method = build_method("supervised", {"init": init}, model, INFO)
    (record,) = pretrained_weights(method)
    assert (record["source"], record["tag"], record["file"]) == (
        "checkpoint",
        "model.",
        str(tmp_path / "run.safetensors"),
    )


def test_weights_missing_from_the_cache_are_one_line_naming_them_and_the_fix(hub):
    with pytest.raises(ConfigError) as caught:
        ImageEncoder("test_vit", image_size=32, pretrained="r160_in1k")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "pretrained weights timm test_vit.r160_in1k (model.image.pretrained) are not in the cache"
    )
    assert str(hub.cache) in message and "HF_HUB_OFFLINE=1" in message
    assert "python launcher/fetch_weights.py" in message


def test_a_hub_repository_without_its_file_is_the_same_error(hub):
    put_repo(hub.cache, "timm/test_vit.r160_in1k", {"README.md": b"weights not fetched"})
    with pytest.raises(
        ConfigError, match=r"timm test_vit.r160_in1k \(model.image.pretrained\) are not in the cache"
    ):
        ImageEncoder("test_vit", image_size=32, pretrained=True)


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [
        ("test_vit", "in22k", "unknown pretrained tag; known: test_vit.r160_in1k"),
        ("test_vit", "test_resnet.r160_in1k", "names weights of timm model 'test_resnet', not of"),
        ("test_vit", "test_vit.other", "unknown pretrained tag"),
        ("test_vit.r160_in1k", "test_vit.other", "name different pretrained tags"),
        ("botnet50ts_256", True, "has no pretrained weights in timm"),
        ("resnetv2_50x1_bit.goog_in21k", True, "model-specific code"),
        ("test_vit", 3, "give true"),
    ],
)
def test_bad_names_are_refused_before_anything_is_read(hub, name, pretrained, message):
    with pytest.raises(ConfigError, match=message):
        ImageEncoder(name, image_size=32, pretrained=pretrained)


def test_a_hub_repository_of_another_architecture_names_it(hub):
    put_timm(hub.cache, "test_resnet.r160_in1k")
    with pytest.raises(
        ConfigError, match="holds weights of timm model 'test_resnet'.*model.image.name=test_resnet"
    ):
        ImageEncoder("test_vit", image_size=32, pretrained="hf-hub:timm/test_resnet.r160_in1k")


def test_a_hub_file_that_does_not_fit_is_refused_with_what_differs(hub, tmp_path):
    from safetensors.torch import save_file

    source = put_timm(hub.cache, "test_vit.r160_in1k")
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "norm.weight"}
    save_file(state, tmp_path / "model.safetensors")
    put_repo(
        hub.cache, "timm/test_vit.r160_in1k", {"model.safetensors": tmp_path / "model.safetensors"}, "1" * 40
    )
    with pytest.raises(ConfigError, match=r"does not fit timm model 'test_vit'.*1 missing \(norm.weight\)"):
        ImageEncoder("test_vit", image_size=32, pretrained=True)


def test_a_model_built_for_its_structure_reads_nothing_yet_keeps_the_statistics(hub):
    with structure_only():  # the cache is empty: any read would fail
        encoder = ImageEncoder("test_resnet", image_size=32, pretrained=True)
    assert encoder.data_config["mean"] == (0.5, 0.5, 0.5) and pretrained_weights(encoder) == []


def test_auto_interpolation_is_the_one_the_pretrained_tower_was_trained_with(hub):
    put_timm(hub.cache, "test_vit.r160_in1k")
    model = {"image": {"name": "test_vit", "image_size": 32, "pretrained": True}, "text": None}
    model["head"] = {"kind": "linear"}
    pretrained = build_method("supervised", {}, model, INFO)
    assert resize_interpolation("auto", pretrained) == "bicubic"  # test_vit.r160_in1k's pretrained_cfg
    assert resize_interpolation("nearest", pretrained) == "nearest"  # the run's own choice
    model["image"]["pretrained"] = None
    scratch = build_method("supervised", {}, model, INFO)
    assert scratch.model.image_encoder.data_config["interpolation"] == "bicubic"
    assert resize_interpolation("auto", scratch) == "bilinear"  # no weights to match


def test_towers_whose_weights_disagree_ask_for_one_interpolation(hub):
    put_timm(hub.cache, "test_resnet.r160_in1k")  # bilinear
    put_timm(hub.cache, "test_vit.r160_in1k")  # bicubic
    model = {
        "cnn": {"name": "test_resnet", "image_size": 32, "pretrained": True},
        "vit": {"name": "test_vit", "image_size": 32, "pretrained": True},
    }
    method = build_method("cass", {"embed_from": "both"}, model, INFO)
    with pytest.raises(ConfigError) as caught:
        resize_interpolation("auto", method)
    assert str(caught.value) == (
        "data.interpolation=auto: the image towers' weights were trained with different interpolations "
        "(encoders.cnn: bilinear, encoders.vit: bicubic); set data.interpolation to one"
    )
    assert resize_interpolation("bicubic", method) == "bicubic"


def test_a_kept_classifier_loads_from_the_hub_with_the_rest(hub):
    source = put_timm(hub.cache, "test_vit.r160_in1k", seed=5)
    encoder = ImageEncoder("test_vit", image_size=160, pretrained=True, keep_classifier=True)
    theirs = source.state_dict()
    assert encoder.model.state_dict().keys() == theirs.keys()
    assert torch.equal(encoder.model.head.weight, theirs["head.weight"])
    assert encoder.model.num_classes == source.num_classes
