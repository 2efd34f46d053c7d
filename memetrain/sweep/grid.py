"""A sweep's grid: methods (the rows of a table) x axes x seeds, expanded into jobs.

A sweep config (``configs/sweep/<name>.yaml``, every key documented in ``configs/sweep/demo.yaml``)
names ``methods``, each with the ``train`` overrides of its evaluated run and optionally a
``pretrain`` run before it and a method it comes ``after``; ``axes`` such as image size or label
fraction, each value a list of overrides; ``seeds``; and ``overrides`` for every run. A job is one
(method, axis values, seed), named from them (``dino-resnet50-384px-seed1``), and runs its
pretraining in ``<job>/pretrain`` (if any), then its evaluated run in ``<job>``.

Two placeholders in overrides stand for weights that exist only once earlier runs have finished,
and are filled in when the job starts (:func:`fill_weights`):

- ``<pretrain>``: ``model.safetensors`` of the newest checkpoint of this job's pretraining run;
- ``<after>``: the same of the job it comes after: method ``after`` with the same axis values and
  seed (SemiMemes after the CLIP run whose features it uses). Such jobs form a later stage.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memetrain.errors import ConfigError

PRETRAIN, AFTER = "<pretrain>", "<after>"
SWEEP_KEYS = {"name", "reference", "seeds", "overrides", "methods", "axes"}
METHOD_KEYS = {"train", "pretrain", "after"}
_LABEL = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")
_PLACEHOLDER = re.compile(r"<[^<>=,{}]*>")


@dataclass
class JobSpec:
    """One job of a sweep: where it sits in the grid and the overrides of its runs."""

    name: str
    group: dict[str, str]  # the grid values but the seed: {"method": ..., <axis>: <label>}
    seed: int
    overrides: list[str]  # of the evaluated run (launcher/train.py, without hydra.run.dir)
    pretrain: list[str] | None = None  # of the pretraining run before it, if any
    after: str | None = None  # the job whose weights <after> names
    stage: int = 0  # 0, or one more than the stage of the job it comes after
    runs: list[tuple[str, list[str]]] = field(init=False)  # (run directory relative to the job's, overrides)

    def __post_init__(self):
        self.runs = ([("pretrain", self.pretrain)] if self.pretrain is not None else []) + [
            (".", self.overrides)
        ]


def expand(
    sweep: Mapping[str, Any],
    seeds: Sequence[int] | None = None,
    data: str | None = None,
    overrides: Sequence[str] = (),
) -> list[JobSpec]:
    """The sweep's jobs, ordered by stage, method, axis values and seed.

    ``seeds`` replaces the sweep's seeds, ``data`` sets ``data=<data>`` in every run and
    ``overrides`` come last in every run (a later override of a key replaces an earlier one).
    """
    _check_keys(sweep, SWEEP_KEYS, "the sweep config", required={"name", "methods", "seeds"})
    methods: Mapping[str, Mapping[str, Any]] = sweep["methods"]
    axes: Mapping[str, Mapping[str, Sequence[str]]] = sweep.get("axes") or {}
    seeds = list(sweep["seeds"] if seeds is None else seeds)
    if not methods or not seeds:
        raise ConfigError(f"sweep {sweep['name']}: give at least one method and one seed")
    if not all(isinstance(seed, int) for seed in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"sweep {sweep['name']}: seeds={seeds} must be distinct integers")
    for label in [*methods, *axes, *(value for axis in axes.values() for value in axis)]:
        if not _LABEL.match(str(label)):
            raise ConfigError(
                f"sweep {sweep['name']}: {label!r} cannot be part of a job name; use letters, digits, _ . and -"
            )
    if "method" in axes:
        raise ConfigError(f"sweep {sweep['name']}: 'method' names the methods; call the axis otherwise")
    for label, method in methods.items():
        _check_method(sweep["name"], label, method, methods)
    stages = {label: _stage(label, methods) for label in methods}

    tail = [f"data={data}"] if data else []
    tail += list(overrides)
    jobs = []
    for label, method in methods.items():
        for values in itertools.product(*(axis.items() for axis in axes.values())):
            axis_labels = [value_label for value_label, _ in values]
            common = [
                *sweep.get("overrides", []),
                *(o for _, value_overrides in values for o in value_overrides),
            ]
            for seed in seeds:
                runs = {
                    part: merge_overrides([*common, *method[part], *tail, f"seed={seed}"])
                    for part in ("pretrain", "train")
                    if method.get(part) is not None
                }
                after = method.get("after")
                jobs.append(
                    JobSpec(
                        name=job_name(label, axis_labels, seed),
                        group={"method": label, **dict(zip(axes, axis_labels))},
                        seed=seed,
                        overrides=runs["train"],
                        pretrain=runs.get("pretrain"),
                        after=job_name(after, axis_labels, seed) if after else None,
                        stage=stages[label],
                    )
                )
    return sorted(jobs, key=lambda job: job.stage)  # stable: the grid order within a stage


def job_name(method: str, axis_labels: Iterable[str], seed: int) -> str:
    return "-".join([method, *axis_labels, f"seed{seed}"])


def merge_overrides(overrides: Iterable[str]) -> list[str]:
    """Hydra overrides where a later one of the same key replaces an earlier one (Hydra refuses a
    key given twice): ``data=hateful_memes ... data=synth`` becomes ``... data=synth``."""
    merged: dict[str, str] = {}
    for override in overrides:
        override = str(override)
        if "=" not in override and not override.startswith("~"):
            raise ConfigError(f"override {override!r} is not key=value (or ~key to delete a default)")
        key = override.split("=", 1)[0].lstrip("+~")
        merged.pop(key, None)
        merged[key] = override
    return list(merged.values())


def fill_weights(overrides: Sequence[str], weights: Mapping[str, Path]) -> list[str]:
    """Replace each placeholder by its weights file, quoted for Hydra's override grammar."""
    quoted = {
        token: "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"
        for token, path in weights.items()
    }
    filled = []
    for override in overrides:
        for token, path in quoted.items():
            override = override.replace(token, path)
        filled.append(override)
    return filled


def _check_method(sweep: str, label: str, method: Any, methods: Mapping[str, Any]) -> None:
    where = f"sweep {sweep}, method {label}"
    if not isinstance(method, Mapping):
        raise ConfigError(f"{where}: give a mapping with train (and optionally pretrain, after)")
    _check_keys(method, METHOD_KEYS, where, required={"train"})
    after = method.get("after")
    if after is not None and after not in methods:
        raise ConfigError(f"{where}: after={after!r} is not a method of the sweep ({', '.join(methods)})")
    allowed = {"pretrain": set(), "train": {PRETRAIN} if method.get("pretrain") else set()}
    for part in ("pretrain", "train"):
        if after is not None:
            allowed[part].add(AFTER)
        for override in method.get(part) or []:
            for token in _PLACEHOLDER.findall(str(override)):
                if token not in allowed[part]:
                    need = {PRETRAIN: "a pretrain run (used in train only)", AFTER: "after: <method>"}
                    raise ConfigError(
                        f"{where}: {part} override {override!r} uses {token}, which needs "
                        + need.get(token, f"one of {PRETRAIN}, {AFTER} (the only placeholders)")
                    )


def _stage(label: str, methods: Mapping[str, Any], seen: tuple[str, ...] = ()) -> int:
    if label in seen:
        raise ConfigError(f"methods come after each other in a cycle: {' -> '.join([*seen, label])}")
    after = methods[label].get("after")
    return 0 if after is None else 1 + _stage(after, methods, (*seen, label))


def _check_keys(mapping: Mapping, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    unknown = sorted(set(mapping) - allowed)
    missing = sorted(required - set(mapping))
    if unknown or missing:
        problem = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
        raise ConfigError(f"{where}: {problem}; it takes {', '.join(sorted(allowed))}")
