"""End to end, as on a compute node: launcher/train.py with HF_HUB_OFFLINE=1 and a Hugging Face cache
that holds the weights a run names (timm, transformers, open_clip), trained two steps; and a cache
that lacks them: one error line whose fetch_weights command, run where the weights are, finds them."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from safetensors.torch import load_file

from memetrain.data.manifest import Manifest
from memetrain.data.tokenizer import TextEncoder
from tests.helpers import run_launcher, tiny_run_overrides
from tests.hub.hub_cache import put_bert, put_open_clip, put_timm


def train(hub, shards, run_dir, *overrides):
    result = run_launcher("train.py", *tiny_run_overrides(shards, run_dir, steps=2), *overrides, env=hub.env)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(str(run_dir / "checkpoints" / "step_0000002" / "model.safetensors"))


@pytest.mark.slow
def test_timm_weights_by_name_from_the_cache(hub, synth_shards, tmp_path):
    source = put_timm(hub.cache, "test_vit.r160_in1k", seed=7).state_dict()
    trained = train(
        hub, synth_shards, tmp_path / "run",
        "model.image.name=test_vit", "model.image.pretrained=true", "model.image.freeze=true",
    )  # fmt: skip
    prefix = "model.image_encoder.model."
    loaded = {k.removeprefix(prefix): v for k, v in trained.items() if k.startswith(prefix)}
    assert loaded.keys() == source.keys() - {"head.weight", "head.bias"}
    assert all(torch.equal(loaded[k], source[k]) for k in loaded if k != "pos_embed")  # frozen: as loaded
    assert loaded["pos_embed"].shape == (1, 5, 64)  # resampled from 160 px to the run's 32 px
    log = (tmp_path / "run" / "train.log").read_text()
    assert (
        f"timm test_vit.r160_in1k: weights from {hub.cache}/models--timm--test_vit.r160_in1k/snapshots/"
        in log
    )
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["resize_interpolation"] == "bicubic"  # the weights' own (data.interpolation=auto)
    assert json.loads((tmp_path / "run" / "model" / "bundle.json").read_text())["interpolation"] == "bicubic"


@pytest.mark.slow
def test_a_bert_by_model_id_from_the_cache(hub, synth_shards, tmp_path):
    manifest = Manifest.load(synth_shards)
    vocab = TextEncoder(synth_shards / manifest.tokenizer, 24).vocab_size  # ids the pack's tokenizer gives
    source = put_bert(hub.cache, "bert-base-uncased", vocab_size=vocab, seed=8).state_dict()
    trained = train(
        hub, synth_shards, tmp_path / "run",
        "model/text=transformer", "model.text.pretrained=bert-base-uncased", "model.text.freeze=true",
    )  # fmt: skip
    prefix = "model.text_encoder.model."
    loaded = {k.removeprefix(prefix): v for k, v in trained.items() if k.startswith(prefix)}
    assert loaded.keys() == {k for k in source if not k.startswith("pooler.")}
    assert all(torch.equal(loaded[k], source[k]) for k in loaded)
    assert "transformers bert-base-uncased: weights from" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_an_open_clip_model_and_tag_from_the_cache(hub, synth_shards, tmp_path):
    import open_clip

    # random weights in fp16, as OpenAI's are, where open_clip finds ViT-B-32's openai tag
    torch.manual_seed(9)
    model = open_clip.create_model("ViT-B-32-quickgelu", init_logit_scale=math.log(20.0))
    source = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    del model
    put_open_clip(hub.cache, "ViT-B-32", "openai", source)
    trained = train(
        hub, synth_shards, tmp_path / "run",
        "method=clip", "model=clip_open_clip", "eval=probe", "eval.tsne=false", "eval.protocols=[knn]", "data.eval_splits=[dev]",
        "method.tower=open_clip", "method.open_clip_model=ViT-B-32", "method.open_clip_weights=openai",
        "trainer.lr=0", "trainer.min_lr=0",  # two steps that change nothing: the checkpoint is what loaded
    )  # fmt: skip
    prefix = "model.clip."
    loaded = {k.removeprefix(prefix): v for k, v in trained.items() if k.startswith(prefix)}
    assert loaded.keys() == source.keys()
    resized = {"visual.positional_embedding"}  # 7 x 7 patches at 224 px, 1 x 1 at the run's 32 px
    assert all(torch.equal(loaded[k], source[k].float()) for k in loaded.keys() - resized)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "open_clip ViT-B-32 openai: weights from" in log and "QuickGELU" in log
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["resize_interpolation"] == "bicubic"  # CLIP's preprocess (data.interpolation=auto)


@pytest.mark.slow
def test_missing_weights_are_one_error_line_whose_command_fetches_them(hub, synth_shards, tmp_path):
    overrides = ["model.image.name=test_vit", "model.image.pretrained=r160_in1k"]
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path / "run", 2), *overrides, env=hub.env
    )
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr
    assert line.startswith(
        f"error: pretrained weights timm test_vit.r160_in1k (model.image.pretrained) are not in the cache {hub.cache} "
        "and HF_HUB_OFFLINE=1 keeps them from being downloaded"
    )
    command = shlex.split(line.split("same HF_HOME): ")[1])
    assert command[:2] == ["python", "launcher/fetch_weights.py"] and set(overrides) <= set(command)
    assert not any(arg.startswith("hydra.") for arg in command)
    put_timm(hub.cache, "test_vit.r160_in1k")  # what the command does where the network is
    fetched = run_launcher("fetch_weights.py", *command[2:], env=hub.env)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert "timm test_vit.r160_in1k  model.image.pretrained  in the cache" in fetched.stdout
