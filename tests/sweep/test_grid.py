"""Sweep grids: expansion into named jobs, override merging, placeholders, stages, the record's
consistency check, and every shipped sweep composing as launcher/train.py runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memetrain.cli import CONFIG_DIR
from memetrain.errors import ConfigError
from memetrain.sweep.grid import AFTER, PRETRAIN, expand, fill_weights, merge_overrides
from memetrain.sweep.job import JobFailed, latest_weights
from memetrain.sweep.monitor import last_output
from memetrain.sweep.record import JobState, check_unchanged, load, write

SWEEPS = sorted(path.stem for path in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))

GRID = {
    "name": "g",
    "seeds": [0, 1],
    "overrides": ["data=hateful_memes", "trainer.max_steps=10"],
    "methods": {
        "clip": {"train": ["method=clip", "eval=probe"]},
        "dino-r50": {
            "pretrain": ["method=dino", "model=backbone_resnet50"],
            "train": ["model=resnet50", f"method.init.image={{path:{PRETRAIN},prefix:teacher.backbone.}}"],
        },
        "semi": {"after": "clip", "train": ["method=semimemes", f"method.clip.weights={AFTER}"]},
    },
    "axes": {
        "size": {"224px": ["data.image_size=224"], "384px": ["data.image_size=384", "trainer.max_steps=20"]}
    },
}


def test_jobs_are_methods_by_axes_by_seeds_named_from_their_values():
    jobs = expand(GRID)
    assert [job.name for job in jobs] == [
        "clip-224px-seed0", "clip-224px-seed1", "clip-384px-seed0", "clip-384px-seed1",
        "dino-r50-224px-seed0", "dino-r50-224px-seed1", "dino-r50-384px-seed0", "dino-r50-384px-seed1",
        "semi-224px-seed0", "semi-224px-seed1", "semi-384px-seed0", "semi-384px-seed1",
    ]  # fmt: skip
    dino = jobs[6]
    assert dino.group == {"method": "dino-r50", "size": "384px"} and dino.seed == 0 and dino.stage == 0
    # common, then the axis value (its max_steps replaces the common one), then the method, then the seed
    assert dino.pretrain == [
        "data=hateful_memes", "data.image_size=384", "trainer.max_steps=20", "method=dino",
        "model=backbone_resnet50", "seed=0",
    ]  # fmt: skip
    assert dino.runs == [("pretrain", dino.pretrain), (".", dino.overrides)]
    assert dino.overrides[-2:] == ["method.init.image={path:<pretrain>,prefix:teacher.backbone.}", "seed=0"]
    semi = jobs[-1]
    assert semi.after == "clip-384px-seed1" and semi.stage == 1 and semi.pretrain is None
    assert [job.stage for job in jobs] == [0] * 8 + [1] * 4


def test_seeds_data_and_overrides_from_the_command_line_come_last():
    jobs = expand(GRID, seeds=[7], data="synth", overrides=["trainer.max_steps=3", "+extra=1"])
    assert {job.seed for job in jobs} == {7} and len(jobs) == 6
    clip = jobs[0]
    assert clip.overrides == [
        "data.image_size=224", "method=clip", "eval=probe", "data=synth", "trainer.max_steps=3", "+extra=1", "seed=7",
    ]  # fmt: skip


def test_merge_overrides_keeps_the_last_value_of_each_key():
    merged = merge_overrides(["a=1", "b.c=2", "~model/image@model.vit", "+a=3", "model/image@model.vit=x"])
    assert merged == ["b.c=2", "+a=3", "model/image@model.vit=x"]
    with pytest.raises(ConfigError, match="'oops' is not key=value"):
        merge_overrides(["oops"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": {"m": {"train": [f"x={PRETRAIN}"]}}}, "uses <pretrain>, which needs a pretrain run"),
        ({"methods": {"m": {"train": [f"x={AFTER}"]}}}, "uses <after>, which needs after: <method>"),
        ({"methods": {"m": {"train": ["x=<weights>"]}}}, "uses <weights>, which needs one of"),
        ({"methods": {"m": {"pretrain": [f"x={PRETRAIN}"], "train": []}}}, "pretrain override"),
        ({"methods": {"m": {"train": [], "after": "n"}}}, "after='n' is not a method of the sweep"),
        (
            {"methods": {"a": {"train": [], "after": "b"}, "b": {"train": [], "after": "a"}}},
            "in a cycle: a -> b -> a",
        ),
        ({"methods": {"m": {"train": [], "pretrian": []}}}, r"unknown key\(s\) \['pretrian'\]"),
        ({"methods": {"m x": {"train": []}}}, "'m x' cannot be part of a job name"),
        ({"seeds": [1, 1]}, "must be distinct integers"),
        ({"axes": {"method": {"a": []}}}, "call the axis otherwise"),
        ({"grid": {}}, r"unknown key\(s\) \['grid'\]"),
    ],
)
def test_bad_sweeps_are_refused_with_the_reason(change, message):
    with pytest.raises(ConfigError, match=message):
        expand({"name": "bad", "seeds": [0], "methods": {"m": {"train": []}}, **change})


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_run_of_every_shipped_sweep_composes(sweep, tmp_path):
    weights = {PRETRAIN: tmp_path / "p" / "model.safetensors", AFTER: tmp_path / "a" / "model.safetensors"}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        jobs = expand(OmegaConf.to_container(compose("sweep", [f"+sweep={sweep}"]).sweep, resolve=True))
        runs = {tuple(fill_weights(overrides[:-1], weights)) for job in jobs for _, overrides in job.runs}
        for overrides in runs:  # each distinct run once (without its seed)
            composed = json.dumps(OmegaConf.to_container(compose("train", list(overrides)), resolve=True))
            assert PRETRAIN not in composed and AFTER not in composed, overrides


def test_filled_weights_reach_the_config_verbatim(tmp_path):
    odd = tmp_path / "it's a run" / "model.safetensors"
    overrides = fill_weights(
        ["method=semimemes", f"method.clip.weights={AFTER}", f"method.init.image={{path:{AFTER},prefix:x.}}"],
        {AFTER: odd},
    )
    assert _compose(overrides[:2]).method.clip.weights == str(odd)
    assert _compose(["method=supervised", overrides[2]]).method.init.image.path == str(odd)


def test_latest_weights_is_the_numerically_newest_complete_checkpoint(tmp_path):
    for step in ("step_0000900", "step_10000000", ".step_20000000.tmp"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
        (tmp_path / "checkpoints" / step / "model.safetensors").touch()
    assert latest_weights(tmp_path).parent.name == "step_10000000"
    with pytest.raises(JobFailed, match="did that run finish"):
        latest_weights(tmp_path / "nothing")


def test_a_job_directory_cannot_change_its_overrides(tmp_path):
    jobs = expand(GRID)
    write(tmp_path, {"sweep": "g"}, jobs, {job.name: JobState() for job in jobs})
    previous = load(tmp_path)
    assert previous["semi-384px-seed1"]["after"] == "clip-384px-seed1"
    check_unchanged(tmp_path, previous, expand(GRID))  # nothing has run: no directory, nothing to protect
    (tmp_path / "clip-224px-seed0").mkdir()
    check_unchanged(tmp_path, previous, expand(GRID, seeds=[0, 1, 2]))  # new jobs are fine
    with pytest.raises(ConfigError, match="clip-224px-seed0 was run with overrides="):
        check_unchanged(tmp_path, previous, expand(GRID, data="synth"))
    (tmp_path / "sweep.json").write_text("{")
    with pytest.raises(ConfigError, match="sweep.json is not a sweep record"):
        load(tmp_path)


def test_last_output_is_the_newest_progress_fragment(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("loading\ntrain:  10%| 1/10\rtrain:  20%| 2/10\r\n\n")
    assert last_output(log) == "train:  20%| 2/10"
    assert last_output(tmp_path / "missing.log") == "starting"
