"""launcher/fetch_weights.py: the weights a run or a sweep names (composed as the runs compose),
looked up in and fetched into the Hugging Face cache, listed with sizes. No hub can be served here,
so "fetching" finds the cache filled as a download would leave it; the dry run lists without it."""

from __future__ import annotations

import textwrap

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from memetrain.errors import ConfigError
from memetrain.models import fetch
from tests.helpers import REPO, run_launcher
from tests.hub.hub_cache import put_bert, put_repo, put_timm

OPEN_CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip finds (ViT-B-32, openai)
SEMIMEMES = [
    "method=semimemes", "model=clip_small",
    "model.image.name=test_vit", "model.image.pretrained=true",
    "model.text.pretrained=bert-base-uncased",
    "method.clip.tower=open_clip", "method.clip.open_clip_model=ViT-B-32", "method.clip.open_clip_weights=openai",
]  # fmt: skip


def fill(hub) -> dict[str, int]:
    """The three weights of SEMIMEMES in the cache (the open_clip file's bytes are a stand-in: the
    fetch reads no weights); returns each weights file's size."""
    put_timm(hub.cache, "test_vit.r160_in1k")
    put_bert(hub.cache, "bert-base-uncased", vocab_size=40)
    put_repo(hub.cache, OPEN_CLIP_REPO, {"open_clip_model.safetensors": b"x" * 2_500_000})
    size = lambda pattern: next(hub.cache.glob(pattern)).stat().st_size  # noqa: E731
    return {
        "timm": size("models--timm--test_vit.r160_in1k/snapshots/*/model.safetensors"),
        "bert": size("models--bert-base-uncased/snapshots/*/model.safetensors"),
        "open_clip": 2_500_000,
    }


def test_a_run_names_its_towers_and_its_frozen_clips_weights(hub):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        (named_timm, named_text, named_clip) = fetch.collect([SEMIMEMES])
    assert (named_timm.source.describe(), named_timm.options) == (
        "timm test_vit.r160_in1k",
        ["model.image.pretrained"],
    )
    assert (named_text.source.describe(), named_text.options) == (
        "transformers bert-base-uncased",
        ["model.text.pretrained"],
    )
    assert named_clip.source.describe() == "open_clip ViT-B-32 openai"
    assert named_clip.options == ["method.clip.open_clip_weights"]


def test_the_dry_run_says_what_the_cache_holds_and_the_fetch_finds_it(hub):
    sizes = fill(hub)
    (hub.cache / "models--bert-base-uncased").rename(hub.cache / "elsewhere")  # one not fetched yet
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        named = fetch.collect([SEMIMEMES])
    lines, missing = fetch.fetch(named, dry_run=True)
    assert "in the cache" in lines[0] and "to fetch" in lines[1] and "in the cache" in lines[2]
    assert (
        "2.5 MB" in lines[2]
        and lines[-1]
        == f"total {fetch._size(sizes['timm'] + sizes['open_clip'])} (dry run: nothing downloaded)"
    )
    assert missing == ["transformers bert-base-uncased"]  # offline: it cannot be had here
    with pytest.raises(
        ConfigError, match="pretrained weights transformers bert-base-uncased .* not in the cache"
    ):
        fetch.fetch(named, dry_run=False)
    (hub.cache / "elsewhere").rename(hub.cache / "models--bert-base-uncased")
    lines, missing = fetch.fetch(named, dry_run=False)
    assert missing == [] and all("in the cache" in line for line in lines[:3])
    assert lines[-1] == f"total {fetch._size(sum(sizes.values()) + _bert_config(hub))}, 0 B fetched now"


def _bert_config(hub) -> int:
    return next(hub.cache.glob("models--bert-base-uncased/snapshots/*/config.json")).stat().st_size


def test_a_sweep_is_every_run_of_its_jobs_once(hub, tmp_path):
    sweep = {
        "name": "mine",
        "seeds": [0, 1, 2],
        "overrides": ["data=synth"],
        "methods": {
            "vit": {"train": ["model=vit_tiny", "model.image.name=test_vit", "model.image.pretrained=true"]},
            "dino-then-vit": {
                "pretrain": ["method=dino", "model=backbone_vit_tiny", "model.image.pretrained=r160_in1k",
                             "model.image.name=test_vit"],
                "train": ["model=vit_tiny", "method.init.image={path:<pretrain>,prefix:teacher.backbone.}"],
            },
        },
    }  # fmt: skip
    cfg = OmegaConf.create({"sweep": sweep})
    runs = fetch.runs_of(cfg, ["+sweep=mine", "dry_run=true", "hydra.searchpath=[x]", "trainer.max_steps=5"])
    assert len(runs) == 3  # the seeds share runs; the pretraining run is one of them
    assert all(run[-2:] == ["trainer.max_steps=5", "seed=0"] for run in runs)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        (named,) = fetch.collect(runs)
    assert named.source.describe() == "timm test_vit.r160_in1k" and named.options == [
        "model.image.pretrained"
    ]


def test_a_local_file_that_is_not_there_cannot_be_had(hub, tmp_path):
    overrides = ["model.image.name=resnet18", f"model.image.pretrained={tmp_path}/r18.safetensors"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        named = fetch.collect([overrides])
    lines, missing = fetch.fetch(named, dry_run=True)
    assert "not found" in lines[0] and missing == [f"local file {tmp_path}/r18.safetensors"]


@pytest.mark.slow
def test_the_launcher_lists_a_sweeps_weights_with_sizes(hub, tmp_path):
    sizes = fill(hub)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "fetch_test.yaml").write_text(textwrap.dedent(f"""
        name: fetch_test
        seeds: [0, 1]
        methods:
          image: {{train: [model=vit_tiny, model.image.name=test_vit, model.image.pretrained=true]}}
          semimemes: {{train: [{", ".join(SEMIMEMES)}]}}
        """))  # fmt: skip
    search = f"hydra.searchpath=[file://{tmp_path}]"
    listed = run_launcher("fetch_weights.py", search, "+sweep=fetch_test", "dry_run=true", env=hub.env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    out = listed.stdout
    assert f"cache: {hub.cache} (HF_HUB_OFFLINE=1: nothing can be downloaded here)" in out
    assert "2 runs name 3 pretrained weights:" in out
    assert "timm test_vit.r160_in1k         model.image.pretrained" in out
    assert "open_clip ViT-B-32 openai       method.clip.open_clip_weights  in the cache" in out
    assert "(dry run: nothing downloaded)" in out
    fetched = run_launcher("fetch_weights.py", search, "+sweep=fetch_test", env=hub.env)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert (
        f"{fetch._size(sizes['open_clip'])}  {hub.cache}/models--timm--vit_base_patch32_clip_224.openai/"
        in fetched.stdout
    )
    assert fetched.stdout.rstrip().endswith(", 0 B fetched now")


@pytest.mark.slow
def test_the_launcher_offline_with_an_empty_cache_is_one_error_line(hub):
    result = run_launcher("fetch_weights.py", *SEMIMEMES, env=hub.env)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: pretrained weights timm test_vit.r160_in1k (model.image.pretrained)")
    assert "Traceback" not in result.stderr
    listed = run_launcher("fetch_weights.py", *SEMIMEMES, "dry_run=true", env=hub.env)
    assert listed.returncode == 2 and listed.stdout.count("to fetch") == 3
    assert "error: 3 of them cannot be had here" in listed.stderr
