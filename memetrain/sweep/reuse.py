"""A sweep run again reuses a job's directory only if the job would run the config recorded there.

``sweep.json`` guards the overrides of each job (:func:`memetrain.sweep.record.check_unchanged`),
but a run's config is more than its overrides: a default changed in ``configs/`` since the job
ran would leave a finished job skipped, its old results collected under the new config's label.
So every run directory of the sweep that holds a ``config.yaml`` is compared, before anything is
skipped or submitted, with the config its overrides compose to now (Hydra's compose API, the same
composition ``launcher/train.py`` does), by :func:`memetrain.run_record.check_same_config`.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose
from omegaconf import OmegaConf

from memetrain.run_record import CONFIG_FILE, check_same_config, holds_results, read_config
from memetrain.sweep.grid import AFTER, PRETRAIN, JobSpec, fill_weights


def check_job_configs(sweep_dir: Path, jobs: list[JobSpec]) -> int:
    """Refuse the sweep if a run directory holds another config than its job composes to now;
    returns how many run directories were checked."""
    composed: dict[tuple[str, ...], dict] = {}  # by the overrides without the seed: one compose per row
    checked = 0
    for spec in jobs:
        for relative, overrides in spec.runs:
            recorded_at = (sweep_dir / spec.name / relative / CONFIG_FILE).resolve()
            if not recorded_at.is_file() or not holds_results(recorded_at.parent):
                continue
            key = tuple(o for o in overrides if not o.startswith("seed="))
            if key not in composed:  # the placeholders stand in for paths only the job knows
                filled = fill_weights(key, {PRETRAIN: Path(PRETRAIN), AFTER: Path(AFTER)})
                composed[key] = OmegaConf.to_container(compose("train", filled), resolve=True)
            current = {**composed[key], "seed": spec.seed}
            recorded = read_config(recorded_at)
            for name in _filled_by_the_sweep(overrides):  # weights of the job's own earlier runs
                _drop(current, name)
                _drop(recorded, name)
            check_same_config(recorded_at, recorded, current, _ways_out(sweep_dir, spec))
            checked += 1
    return checked


def _filled_by_the_sweep(overrides: list[str]) -> list[str]:
    """The keys whose values name ``<pretrain>`` or ``<after>``: paths the job fills in when it
    starts, from runs of this sweep whose own configs are checked here too."""
    return [o.partition("=")[0].lstrip("+") for o in overrides if PRETRAIN in o or AFTER in o]


def _drop(config: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        config = config.get(part)
        if not isinstance(config, dict):
            return
    config.pop(last, None)


def _ways_out(sweep_dir: Path, spec: JobSpec) -> str:
    return (
        f"The sweep's configs changed since job {spec.name} ran. To keep its results, run the sweep under "
        f"another name= (a new directory); to redo the job with the new config, move {sweep_dir / spec.name} away"
    )
