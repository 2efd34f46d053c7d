"""Evaluation says what it is doing (a progress bar and a log line per pass over a split, the probes
and t-SNE), and does nothing when nothing is asked of it."""

from __future__ import annotations

import pytest

from tests.helpers import run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow


def test_each_evaluation_pass_shows_its_progress(synth_shards, tmp_path):
    result = run_launcher(
        "train.py",
        *tiny_run_overrides(synth_shards, tmp_path, steps=2),
        "eval.protocols=[classifier,linear_probe]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in (
        "evaluating dev: 32 memes of dev",
        "evaluating test: 23 memes of test",
        "features of the labeled training memes: 185 memes of train",
        "linear_probe of hateful on 185 training memes",
        "t-SNE of 32 memes of dev",
    ):
        assert line in result.stderr, line
    assert "evaluating test: 100%" in result.stderr, "a progress bar per split"


def test_no_protocol_and_no_tsne_extract_no_feature(synth_shards, tmp_path):
    result = run_launcher(
        "train.py",
        *tiny_run_overrides(synth_shards, tmp_path, steps=2),
        "eval.protocols=[]",
        "eval.tsne=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluating" not in result.stderr and "features of" not in result.stderr
