"""``trainer.lr_schedule={kind: plateau}``: the rate falls as torch's ReduceLROnPlateau lowers it
(the reference: the same metric values stepped through torch's own scheduler), once per
validation instead of per epoch, in a real training loop; its count survives a resume; bad
options and a run without a dev split are refused."""

from __future__ import annotations

import json

import pytest
import torch

from memetrain.engine.logger import RunLogger
from memetrain.engine.optim import Plateau, lr_at
from memetrain.errors import ConfigError
from tests.engine.test_trainer_steps import build, fit

LOSSES = [1.0, 0.9, 0.95, 0.9, 0.97, 0.5, 0.6, 0.4999, 0.7, 0.8]  # one per validation


def torch_rates(values: list[float], mode: str, patience: int, factor: float, lr: float) -> list[float]:
    """The rate in effect after each value, as torch's ReduceLROnPlateau steps it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, patience=patience, factor=factor
    )
    rates = []
    for value in values:
        scheduler.step(value)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def our_rates(values: list[float], schedule: dict, lr: float) -> list[float]:
    plateau, best, bad, reductions, rates = Plateau.of(schedule), None, 0, 0, []
    for value in values:
        best, bad, lower = plateau.update(value, best, bad)
        reductions += lower
        rates.append(lr_at(0, 10, {"lr": lr, "min_lr": 0.0, "lr_schedule": schedule}, reductions))
    return rates


@pytest.mark.parametrize("patience", [0, 1, 2])
def test_a_loss_lowers_the_rate_as_torch_reduce_lr_on_plateau_does(patience):
    schedule = {"kind": "plateau", "metric": "loss", "patience": patience, "factor": 0.8}
    assert our_rates(LOSSES, schedule, 1e-3) == pytest.approx(torch_rates(LOSSES, "min", patience, 0.8, 1e-3))


def test_a_metric_that_improves_upwards_is_watched_upwards():
    aurocs = [1 - loss for loss in LOSSES]
    schedule = {"kind": "plateau", "metric": "auroc", "patience": 1, "factor": 0.5}
    expected = torch_rates(aurocs, "max", 1, 0.5, 1e-3)
    assert our_rates(aurocs, schedule, 1e-3) == pytest.approx(expected)
    assert expected[-1] < 1e-3  # the case lowers the rate at least once


def test_the_rate_never_falls_below_min_lr():
    trainer = {"lr": 1e-3, "min_lr": 4e-4, "lr_schedule": {"kind": "plateau", "factor": 0.5}}
    assert [lr_at(0, 10, trainer, r) for r in range(3)] == pytest.approx([1e-3, 5e-4, 4e-4])


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"patience": -1}, r"trainer.lr_schedule.patience=-1: give a whole number >= 0"),
        ({"factor": 1.5}, r"trainer.lr_schedule.factor=1.5: give a number between 0 and 1"),
        ({"gamma": 0.5}, r"trainer.lr_schedule has gamma, which plateau does not take"),
    ],
)
def test_bad_options_are_refused_naming_them(schedule, message):
    with pytest.raises(ConfigError, match=message):
        lr_at(0, 10, {"lr": 1e-3, "min_lr": 0.0, "lr_schedule": {"kind": "plateau", **schedule}})


class ScriptedDevMetrics:
    """Stands in for :class:`memetrain.eval.validation.Validation`: the dev metrics of each
    validation, in order (what the schedule reacts to is under test here, not how they are computed)."""

    def __init__(self, values: list[float]):
        self.values = iter(values)

    def __call__(self, method, accelerator) -> dict[str, float]:
        return {"loss": next(self.values)}


def test_the_training_loop_lowers_the_rate_after_each_plateau_and_a_resume_keeps_it(synth_shards, tmp_path):
    schedule = {"kind": "plateau", "metric": "loss", "patience": 1, "factor": 0.5}
    options = dict(max_steps=len(LOSSES), val_every=1, log_every=1, lr=1e-2, min_lr=0.0, lr_schedule=schedule)
    trainer = build(synth_shards, tmp_path, 8, 1, validation=ScriptedDevMetrics(LOSSES), **options)
    state = fit(trainer, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    used = [row["train/lr"] for row in rows if "train/lr" in row]  # the rate of each step
    after = torch_rates(LOSSES, "min", 1, 0.5, 1e-2)  # in effect after each validation
    assert used == pytest.approx([1e-2, *after[:-1]])
    assert state.lr_reductions == 2 and used[-1] < used[0]

    resumed = build(synth_shards, tmp_path, 8, 1, validation=ScriptedDevMetrics([]), **options)
    resumed.fit(lambda step: RunLogger(tmp_path / "again", True, step), trainer.checkpointer.latest())
    assert (resumed.state.lr_reductions, resumed.state.plateau_best, resumed.state.plateau_bad) == (
        state.lr_reductions,
        state.plateau_best,
        state.plateau_bad,
    )


def test_a_run_without_a_dev_split_is_refused(synth_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"plateau lowers the rate when a dev metric stops improving"):
        build(synth_shards, tmp_path, 8, 1, lr_schedule={"kind": "plateau"})
