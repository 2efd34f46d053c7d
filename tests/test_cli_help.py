"""Every launcher's --help says what it does and lists its own config groups only."""

from __future__ import annotations

import pytest

from tests.helpers import run_launcher

PROGRAMS = {
    "train.py": (
        "Train a method on packed memes",
        ["data:", "model:", "model/image:", "method:", "trainer:", "eval:"],
    ),
    "sweep.py": ("Run a grid of methods x seeds", ["sweep:", "launcher:", "data:"]),
    "pack.py": ("Pack a meme dataset into WebDataset shards", ["source:"]),
    "collect.py": ("Collect a sweep", ["published:"]),
    "predict.py": ("Score new memes with a trained model", []),
    "export.py": ("Export a trained model to ONNX or TorchScript", []),
    "inspect_shards.py": ("Stream one split of a pack once", []),
}
EVERY_GROUP = (
    "data:",
    "model:",
    "method:",
    "trainer:",
    "eval:",
    "sweep:",
    "launcher:",
    "source:",
    "published:",
)


@pytest.mark.parametrize("script", PROGRAMS)
def test_help_says_what_the_program_does_and_lists_its_own_groups(script):
    what, groups = PROGRAMS[script]
    result = run_launcher(script, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    header, _, options = result.stdout.partition("== Options")
    assert header.startswith(f"launcher/{script}") and what in header.splitlines()[0]
    assert "powered by Hydra" not in result.stdout
    listed = [line.split(" ")[0] for line in header.splitlines() if line.split(" ")[0] in EVERY_GROUP]
    assert sorted(listed) == sorted(group for group in groups if group in EVERY_GROUP)
    assert options.strip(), "the options follow the header"
