"""Image encoders: normalisation, shapes, strict local weights, error messages, checkpointing, freezing."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from memetrain.errors import ConfigError
from memetrain.models import ImageEncoder, ImageNormalizer


def uint8_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def test_normalizer_matches_hand_computation():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    out = ImageNormalizer(mean, std)(images)
    for channel in range(3):
        for column, value in enumerate((0, 51, 255)):
            expected = (value / 255 - mean[channel]) / std[channel]
            assert out[0, channel, 0, column].item() == pytest.approx(expected, abs=1e-6)
    assert out.dtype == torch.float32
    assert ImageNormalizer(mean, std)(images, torch.bfloat16).dtype == torch.bfloat16


def test_normalizer_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        ImageNormalizer((0.5,) * 3, (0.5,) * 3)(torch.zeros(1, 3, 4, 4))


def test_normalizer_buffers_are_not_checkpointed():
    assert ImageNormalizer((0.5,) * 3, (0.5,) * 3).state_dict() == {}


@pytest.mark.parametrize(
    ("name", "size", "dim"),
    [("resnet18", 64, 512), ("vit_tiny_patch16_224", 32, 192), ("vit_tiny_patch16_224", 64, 192)],
)
def test_encoder_shapes(name, size, dim):
    torch.manual_seed(0)
    encoder = ImageEncoder(name, image_size=size).eval()
    with torch.no_grad():
        features = encoder(uint8_images(2, size))
    assert features.shape == (2, dim) and encoder.out_dim == dim


def test_encoder_normalises_with_the_models_statistics():
    encoder = ImageEncoder("vit_tiny_patch16_224", image_size=32).eval()
    images = uint8_images(2, 32)
    with torch.no_grad():
        expected = encoder.model((images.float() / 255 - 0.5) / 0.5)
        assert torch.allclose(encoder(images), expected, atol=1e-5)


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("vit_tiny_patch16_224", 32)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_exactly_and_offline(offline, tmp_path, name, size, suffix):
    torch.manual_seed(1)
    source = (
        timm.create_model(name, pretrained=False, img_size=size) if "vit" in name else timm.create_model(name)
    )
    path = tmp_path / f"weights{suffix}"
    state = source.state_dict()  # with its 1000-class classifier, as published checkpoints are
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    torch.manual_seed(2)  # a different random init, so equality means the file was loaded
    encoder = ImageEncoder(name, image_size=size, pretrained=str(path))
    loaded = encoder.model.state_dict()
    assert loaded, "no parameters"
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert "state_dict" not in encoder.model.pretrained_cfg


@pytest.mark.parametrize(("name", "classifier"), [("test_resnet", "fc"), ("test_vit", "head")])
def test_a_kept_classifier_loads_from_a_local_file_with_the_rest(offline, tmp_path, name, classifier):
    torch.manual_seed(1)
    sized = {"img_size": 32} if "vit" in name else {}
    state = timm.create_model(name, pretrained=False, **sized).state_dict()  # 1000 ImageNet classes
    save_file(state, tmp_path / "weights.safetensors")
    torch.manual_seed(2)
    encoder = ImageEncoder(
        name, image_size=32, pretrained=str(tmp_path / "weights.safetensors"), keep_classifier=True
    )
    loaded = encoder.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert encoder.dropped_names == () and f"{classifier}.weight" in loaded
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert encoder.logits(images).shape == (2, 1000)
        assert encoder(images).shape == (2, encoder.out_dim)


def test_vit_weights_are_resampled_to_another_image_size(offline, tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    encoder = ImageEncoder(
        "vit_tiny_patch16_224", image_size=64, pretrained=str(tmp_path / "vit.safetensors")
    )
    assert encoder.model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    assert torch.equal(encoder.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_weights_of_another_model_are_refused(offline, tmp_path):
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    state.pop("layer4.1.bn2.weight")
    save_file(state, tmp_path / "resnet18.safetensors")
    with pytest.raises(ConfigError, match=r"1 missing \(layer4.1.bn2.weight\)"):
        ImageEncoder("resnet18", pretrained=str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(ConfigError, match="does not fit timm model 'resnet34'.*missing"):
        ImageEncoder("resnet34", pretrained=str(tmp_path / "resnet18.safetensors"))


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ConfigError, match=str(missing)):
        ImageEncoder("resnet18", pretrained=str(missing))


def test_unknown_model_lists_close_matches():
    with pytest.raises(ConfigError, match="unknown timm model 'vit_tiny_patch16'.*vit_tiny_patch16_224"):
        ImageEncoder("vit_tiny_patch16")
    with pytest.raises(ConfigError, match="resnet50"):
        ImageEncoder("resnet5O")
    with pytest.raises(ConfigError, match="unknown pretrained tag; known: .*resnet18.tv_in1k"):
        ImageEncoder("resnet18.nonsense")


def test_pretrained_tag_selects_the_normalisation():
    assert ImageEncoder("vit_tiny_patch16_224", image_size=32).normalize.shift.flatten().tolist() == [1.0] * 3
    dino = ImageEncoder("vit_small_patch16_224.dino", image_size=32).normalize  # ImageNet statistics
    assert dino.shift.flatten().tolist() == pytest.approx([0.485 / 0.229, 0.456 / 0.224, 0.406 / 0.225])


def test_grad_checkpointing_gives_the_same_gradients():
    images = uint8_images(2, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = ImageEncoder(
            "vit_tiny_patch16_224", image_size=32, grad_checkpointing=checkpointing
        ).train()
        assert encoder.model.grad_checkpointing is checkpointing
        encoder(images).square().sum().backward()
        grads.append({name: p.grad for name, p in encoder.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_frozen_encoder_has_no_gradients_and_stays_in_eval_mode():
    encoder = ImageEncoder("resnet18", freeze=True).train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.model.training
    before = encoder.model.bn1.running_mean.clone()
    encoder(uint8_images(2, 64))
    assert torch.equal(encoder.model.bn1.running_mean, before)
