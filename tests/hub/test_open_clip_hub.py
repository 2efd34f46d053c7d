"""open_clip towers by (model, pretrained tag), as open_clip names its weights, read offline through
open_clip's download_pretrained from a Hugging Face cache; OpenAI's TorchScript files converted
without running them; the tag's statistics and QuickGELU; the one error line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU

from memetrain.errors import ConfigError
from memetrain.methods import build_method
from memetrain.models.hub import image_preprocessing, pretrained_weights
from memetrain.models.weights import structure_only
from tests.hub.conftest import TINY_MEAN, TINY_REPO, TINY_STD, TINY_TAG
from tests.hub.hub_cache import put_open_clip
from tests.methods.test_clip import DATA, meme_batch

NO_TOWERS = {"image": None, "text": None}


def open_clip_method(model: str, weights: str | None, **options):
    options = dict(
        tower="open_clip",
        open_clip_model=model,
        open_clip_weights=weights,
        open_clip_image_size=32,
        **options,
    )
    return build_method("clip", options, NO_TOWERS, DATA)


def assert_loaded(method, state: dict[str, torch.Tensor]) -> None:
    loaded = method.model.clip.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value.to(loaded[name].dtype)), name


def test_a_pretrained_tag_loads_from_the_cache_with_its_statistics_and_quick_gelu(hub, tiny_open_clip):
    state = tiny_open_clip(seed=2)
    path = put_open_clip(hub.cache, "memetrain-tiny", TINY_TAG, state)
    assert path.name == "open_clip_model.safetensors" and f"models--{TINY_REPO.replace('/', '--')}" in str(
        path
    )
    method = open_clip_method("memetrain-tiny", TINY_TAG)
    assert_loaded(method, state)
    assert isinstance(
        method.model.clip.transformer.resblocks[0].mlp.gelu, QuickGELU
    )  # as the tag was trained
    normalize = method.model.normalize
    torch.testing.assert_close(normalize.shift.flatten(), torch.tensor(TINY_MEAN) / torch.tensor(TINY_STD))
    assert method.model.clip.visual.preprocess_cfg["size"] == (32, 32)
    expected = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": TINY_MEAN, "std": TINY_STD}
    assert image_preprocessing(method) == {"model": {**expected, "resize_mode": "shortest"}}
    (record,) = pretrained_weights(method)
    assert record["tower"] == "model" and record["file"] == str(path)
    assert (record["source"], record["name"], record["tag"]) == ("open_clip", "memetrain-tiny", TINY_TAG)
    losses, _ = method.training_step(meme_batch(size=4))
    assert torch.isfinite(losses["contrastive_loss"])


def test_a_frozen_clip_of_semimemes_takes_a_tag_too(hub, tiny_open_clip):
    state = tiny_open_clip(seed=2)
    put_open_clip(hub.cache, "memetrain-tiny", TINY_TAG, state)
    clip = {"tower": "open_clip", "open_clip_model": "memetrain-tiny", "open_clip_weights": TINY_TAG}
    method = build_method("semimemes", {"clip": clip, "hidden_dim": 8, "latent_dim": 4}, NO_TOWERS, DATA)
    loaded = method.clip.model.clip.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in state.items())
    assert [r["tower"] for r in pretrained_weights(method)] == ["clip.model"]


def test_a_tag_missing_from_the_cache_is_one_line_naming_it_and_the_fix(hub, tiny_open_clip):
    with pytest.raises(ConfigError) as caught:
        open_clip_method("memetrain-tiny", TINY_TAG)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"pretrained weights open_clip memetrain-tiny {TINY_TAG} (method.open_clip_weights)"
    )
    assert str(hub.cache) in message and "python launcher/fetch_weights.py" in message


def test_an_unknown_tag_lists_the_models_tags(hub):
    with pytest.raises(
        ConfigError,
        match="neither a local file nor a pretrained tag of open_clip model ViT-B-16 .*laion2b_s34b_b88k",
    ):
        open_clip_method("ViT-B-16", "laion5b")


def test_a_model_built_for_its_structure_reads_nothing_yet_takes_the_tags_architecture(hub, tiny_open_clip):
    with structure_only():  # the cache is empty
        method = open_clip_method("memetrain-tiny", TINY_TAG)
    assert isinstance(method.model.clip.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert pretrained_weights(method) == []


# -- OpenAI's TorchScript files ------------------------------------------------------------------


def openai_torchscript(state: dict[str, torch.Tensor], path: Path) -> Path:
    """``state`` saved as OpenAI saved CLIP: a traced module in half precision whose state dict
    also holds input_resolution, context_length and vocab_size."""
    import open_clip

    model = open_clip.create_model("memetrain-tiny-quickgelu")
    model.load_state_dict(state)
    model = model.half().eval()
    del model.context_length, model.vocab_size  # plain attributes in open_clip, buffers in OpenAI's file
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        model.register_buffer(name, torch.tensor(value))
    inputs = (torch.zeros(1, 3, 32, 32, dtype=torch.half), torch.zeros(1, 16, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, inputs, check_trace=False).save(str(path))
    return path


def test_openai_torchscript_file_loads_into_the_quickgelu_architecture(tiny_open_clip, tmp_path, offline):
    state = tiny_open_clip(seed=3, name="memetrain-tiny-quickgelu")
    path = openai_torchscript(state, tmp_path / "ViT-tiny.pt")
    method = open_clip_method("memetrain-tiny-quickgelu", str(path))
    assert_loaded(method, {name: value.half() for name, value in state.items()})  # OpenAI's are fp16
    assert method.model.clip.logit_scale.dtype == torch.float32
    assert pretrained_weights(method)[0]["source"] == "file"


def test_openai_torchscript_file_needs_the_quickgelu_architecture(tiny_open_clip, tmp_path, offline):
    path = openai_torchscript(
        tiny_open_clip(seed=3, name="memetrain-tiny-quickgelu"), tmp_path / "ViT-tiny.pt"
    )
    with pytest.raises(
        ConfigError,
        match="TorchScript files, trained with QuickGELU; use method.open_clip_model=memetrain-tiny-quickgelu",
    ):
        open_clip_method("memetrain-tiny", str(path))
