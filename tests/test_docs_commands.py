"""Every command the documentation shows (README.md, slurm/README.md, the launchers' docstrings,
the config headers; tests/docs_commands.py finds them) composes: its config groups, keys and values
are the framework's, so no example names an option that is not there. Slurm examples of the paper
sweeps request GPUs. The commands that run on this machine run (tests/test_docs_commands_run.py)."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.docs_commands import APPS, Command, documented_commands
from tests.helpers import REPO

COMMANDS = documented_commands()
PAPER_SWEEPS = {"table1", "table2", "table3", "semimemes", "semimemes-mami", "mami", "assignment"}
SBATCH_APPS = {"slurm/train.sbatch": "train", "slurm/sweep.sbatch": "sweep"}


def app_and_overrides(command: Command) -> tuple[str, list[str]] | None:
    if command.launcher:
        return command.launcher, command.overrides
    words = command.text.split()
    script = next((w for w in words if w in SBATCH_APPS), None)
    if script is None:
        return None
    return SBATCH_APPS[script], [w for w in words[words.index(script) + 1 :] if not w.startswith("-")]


def composed(app: str, overrides: list[str]):
    """The config ``overrides`` compose to for ``app`` (``model=...``: any value)."""
    directory, name = APPS[app]
    filled = [override.replace("...", "placeholder") for override in overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs" / directory), version_base="1.3"):
        return compose(name, filled, return_hydra_config=True)


def test_the_documentation_shows_commands_of_every_launcher():
    assert len(COMMANDS) > 60
    assert {c.launcher for c in COMMANDS} >= {"train", "sweep", "pack", "collect", "predict", "export"}


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if app_and_overrides(c)], ids=lambda c: f"{c.where}:{c.text}"
)
def test_every_documented_command_composes(command):
    app, overrides = app_and_overrides(command)
    cfg = composed(app, overrides)
    OmegaConf.to_container(cfg, resolve=False)  # every value parses


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if (a := app_and_overrides(c)) and a[0] == "sweep"],
    ids=lambda c: f"{c.where}:{c.text}",
)
def test_slurm_examples_of_the_paper_sweeps_request_gpus(command):
    cfg = composed("sweep", app_and_overrides(command)[1])
    if cfg.sweep.name not in PAPER_SWEEPS or cfg.launcher.kind != "slurm" or cfg.dry_run:
        return
    assert cfg.launcher.gpus_per_node >= 1, (
        f"{command.where}: `{command.text}` submits {cfg.sweep.name} (ViT-B/ResNet-50 at 384 px, CLIP ViT-L/14) "
        "to Slurm without asking for a GPU: add launcher.gpus_per_node=1"
    )


def test_the_accelerate_configs_the_commands_name_exist_and_load():
    from accelerate.commands.config.config_args import load_config_from_file

    named = {m for c in COMMANDS for m in re.findall(r"--config_file (\S+)", c.text)}
    assert named
    for path in named:
        assert (REPO / path).is_file(), path
        load_config_from_file(str(REPO / path))
