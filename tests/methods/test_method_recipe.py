"""A method's recipe (method.recipe: the paper's optimiser and schedule as trainer options) reaches
its stages, which lay it over the run's trainer options; bad recipes are refused by name."""

from __future__ import annotations

import pytest

from memetrain.errors import ConfigError
from memetrain.methods import Stage, build_method
from tests.methods.test_clip import DATA


def test_the_recipe_reaches_the_stage_and_wins_over_the_trainer():
    recipe = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.0075, "lr_schedule": {"kind": "constant"}}
    method = build_method("clip", {"embed_dim": 8, "recipe": recipe}, {
        "image": {"name": "resnet18"},
        "text": {"kind": "transformer", "vocab_size": None, "hidden_size": 32, "num_layers": 1, "num_heads": 2},
    }, DATA)  # fmt: skip
    (stage,) = method.stages(100)
    assert dict(stage.trainer) == recipe and method.recipe == recipe
    merged = stage.trainer_options({"optimizer": "adamw", "lr": 1e-3, "warmup_steps": 30})
    assert merged == {"optimizer": "sgd", "lr": 0.0075, "warmup_steps": 30, "momentum": 0.9,
                      "lr_schedule": {"kind": "constant"}}  # fmt: skip


def test_no_recipe_keeps_the_run_trainer():
    assert Stage("train", 10, True).trainer_options({"lr": 1e-3}) == {"lr": 1e-3}
    # the recipe left the stage's other properties as they were
    assert Stage("pretrain", 1, False).reads_unlabeled and not Stage("train", 1, True).reads_unlabeled


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"learning_rate": 1e-3}, "recipe keys \\['learning_rate'\\]"),
        ({"optimizer": "lars"}, "optimizer='lars'"),
    ],
)
def test_bad_recipes_are_refused_by_name(recipe, message):
    with pytest.raises(ConfigError, match=message):
        Stage("train", 10, True, trainer=recipe)
