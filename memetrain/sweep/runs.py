"""The jobs a sweep directory holds and their groups: runs that differ in nothing but the seed.

Two layouts are read:

- a sweep made by ``launcher/sweep.py``: ``sweep.json`` lists every job (name, Hydra overrides,
  group = the grid values except the seed, seed, status, log), and ``<job name>/`` is its run
  directory; the group values are the grouping, so no run's config needs parsing;
- any directory of run directories made by hand (``runs/synth``, a Hydra multirun): every
  sub-directory with a ``config.yaml`` is a run, and runs whose resolved configs are equal once the
  top-level ``seed:`` line is dropped form a group (a text comparison: no YAML parse per run).
  Rows are named by the Hydra choices and overrides that differ between groups, read from one run
  per group (``.hydra/``), and by the config keys that differ where those do not tell groups apart.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memetrain.errors import ConfigError
from memetrain.run_record import CONFIG_FILE, flatten, read_config

SWEEP_FILE = "sweep.json"
STATUSES = ("pending", "running", "done", "failed")
SEED_LINE = re.compile(r"^seed: *(\S*) *\n", re.MULTILINE)
MISSING = object()  # a key a group does not have (distinct from a null value)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: 10x faster


@dataclass
class Job:
    """One run of a sweep (or one run directory) and the group it averages into."""

    name: str
    directory: Path
    seed: int | None
    status: str | None  # pending | running | done | failed from sweep.json; None for a hand-made run
    log: str | None  # where to look when it failed (None: the run's own train.log)
    group: str  # identity: jobs with equal groups differ only in their seed
    settings: dict[str, Any] = field(default_factory=dict)  # what tells the group apart (seed excluded)
    overrides: dict[str, Any] = field(default_factory=dict)  # every Hydra override of the job but the seed
    error: str | None = None  # why it failed, as sweep.json says


def find_jobs(sweep_dir: Path) -> tuple[list[Job], list[str]]:
    """Every job of ``sweep_dir`` in order, and notes on directories that are not counted."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a directory; give a sweep directory such as runs/sweeps/demo")
    sweep_file = sweep_dir / SWEEP_FILE
    if sweep_file.exists():
        jobs = _jobs_from_sweep_file(sweep_dir, sweep_file)
        listed = {job.directory.name for job in jobs}
        extra = sorted(
            name
            for name in _subdirectories(sweep_dir)
            if name not in listed and (sweep_dir / name / "config.yaml").exists()
        )
        notes = [
            f"`{name}/`: a run directory that {SWEEP_FILE} does not list (not counted)" for name in extra
        ]
        return jobs, notes
    jobs, notes = _jobs_from_run_dirs(sweep_dir)
    if not jobs:
        if notes:
            raise ConfigError(f"no readable runs in {sweep_dir}: {notes[0].replace('`', '')}")
        hint = (
            f"{sweep_dir} is itself a run directory: give the directory that holds it, {sweep_dir.parent}"
            if (sweep_dir / "config.yaml").exists()
            else "point it at a sweep (runs/sweeps/<sweep>) or at a directory of run directories (runs/synth)"
        )
        raise ConfigError(
            f"no runs in {sweep_dir}: it has no {SWEEP_FILE} and no sub-directory with a config.yaml; {hint}"
        )
    return jobs, notes


def describe(groups: dict[str, list[Job]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per group, the settings whose values differ between groups (its row's name); and the
    settings every group shares. Groups the settings cannot tell apart (hand-made runs whose configs
    differ in a key no override names) are told apart by the config keys that differ among them."""
    settings = {key: jobs[0].settings for key, jobs in groups.items()}
    keys = _ordered_union(s.keys() for s in settings.values())
    varying = [k for k in keys if len({_text(s.get(k, MISSING)) for s in settings.values()}) > 1]
    first = next(iter(settings.values()))
    common = {k: first[k] for k in keys if k not in varying and k in first}
    items = {key: {k: s.get(k, MISSING) for k in varying} for key, s in settings.items()}
    by_items: dict[tuple[str, ...], list[str]] = {}
    for key, described in items.items():
        by_items.setdefault(tuple(_text(v) for v in described.values()), []).append(key)
    for colliding in by_items.values():
        if len(colliding) > 1:
            configs = {key: flat_config(groups[key][0].directory) for key in colliding}
            config_keys = _ordered_union(c.keys() for c in configs.values())
            for k in config_keys:
                if len({_text(c.get(k, MISSING)) for c in configs.values()}) > 1:
                    for key in colliding:
                        items[key][k] = configs[key].get(k, MISSING)
    return items, common


def flat_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as dotted keys (``data.image_size``), seed removed."""
    flat = flatten(read_config(run_dir / CONFIG_FILE))
    flat.pop("seed", None)
    return flat


def label(items: dict[str, Any]) -> str:
    """``method=cass data.image_size=224``: the settings as Hydra overrides (``key=–`` where absent)."""
    return " ".join(k if v is None and k.startswith("~") else f"{k}={_text(v)}" for k, v in items.items())


def _text(value: Any) -> str:
    if value is MISSING:
        return "–"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _jobs_from_sweep_file(sweep_dir: Path, path: Path) -> list[Job]:
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path} is not readable JSON ({err}); re-run the sweep launcher to rewrite it"
        ) from err
    entries = content.get("jobs") if isinstance(content, dict) else content
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{path} lists no jobs: expected a non-empty list of {{name, overrides, group, ...}}"
        )
    jobs, names = [], set()
    for index, entry in enumerate(entries):
        where = f"{path}, job {index}"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where} is {entry!r}, not an object with name, overrides, group, seed, status"
            )
        missing = [k for k in ("name", "group", "status") if k not in entry]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}; re-run the sweep launcher to rewrite it")
        name, group, status = entry["name"], entry["group"], entry["status"]
        if not isinstance(group, dict) or "seed" in group:
            raise ConfigError(
                f"{where} ({name}): group must be an object of the grid values without the seed"
            )
        if status not in STATUSES:
            raise ConfigError(f"{where} ({name}): status {status!r} is not one of {', '.join(STATUSES)}")
        if name in names:
            raise ConfigError(
                f"{where}: job name {name!r} appears twice; each job needs its own run directory"
            )
        names.add(name)
        overrides = parse_overrides(entry.get("overrides") or [])
        jobs.append(
            Job(
                name=name,
                directory=sweep_dir / name,
                seed=entry.get("seed"),
                status=status,
                log=entry.get("log"),
                group=repr(sorted(group.items())),
                settings=dict(group),
                overrides=overrides,
                error=entry.get("error"),
            )
        )
    return jobs


def _jobs_from_run_dirs(sweep_dir: Path) -> tuple[list[Job], list[str]]:
    """The run directories of ``sweep_dir`` and notes on those with results that cannot be grouped."""
    jobs, settings, notes = [], {}, []
    root = os.fspath(sweep_dir)
    for name in _subdirectories(sweep_dir):
        try:
            with open(f"{root}/{name}/config.yaml") as handle:  # str paths: 10 000 Path joins cost more
                text = handle.read()
        except FileNotFoundError:
            if (sweep_dir / name / "results.json").exists():
                notes.append(
                    f"`{name}/`: has a results.json but no config.yaml (not counted): hand-made runs are "
                    "grouped by their config, so put the run's config.yaml back or move the directory out"
                )
            continue  # not a run directory
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            notes.append(f"`{name}/`: its config.yaml cannot be read ({why}; not counted)")
            continue
        seed = SEED_LINE.search(text)
        group = text if seed is None else text[: seed.start()] + text[seed.end() :]
        directory = sweep_dir / name
        if group not in settings:  # the first run of a group speaks for it
            settings[group] = _hydra_settings(directory)
        jobs.append(
            Job(
                name=name,
                directory=directory,
                seed=_seed(seed.group(1)) if seed else None,
                status=None,
                log=None,
                group=group,
                settings=settings[group],
                overrides=settings[group],
            )
        )
    return jobs, notes


def _hydra_settings(run_dir: Path) -> dict[str, Any]:
    """The run's top-level Hydra choices (``model: lstm``) updated by its overrides, seed excluded;
    empty for a run made without Hydra's ``.hydra/`` record."""
    hydra_dir = run_dir / ".hydra"
    settings: dict[str, Any] = {}
    hydra_yaml = _text_if_exists(hydra_dir / "hydra.yaml")
    if hydra_yaml is not None:
        settings.update(_choices(hydra_yaml))
    overrides = _text_if_exists(hydra_dir / "overrides.yaml") or "[]"
    settings.update(parse_overrides(_plain_items(overrides.splitlines()) or _yaml(overrides) or []))
    return settings


def _choices(hydra_yaml: str) -> dict[str, Any]:
    """``hydra.runtime.choices`` of the top-level config groups (data, model, method, ...).

    Read from the block Hydra writes (``    choices:`` then entries six spaces deep) without
    parsing the whole file; any other layout falls back to a full parse."""
    start = hydra_yaml.find("\n    choices:\n")
    if start >= 0:
        lines = []
        for line in hydra_yaml[start + len("\n    choices:\n") :].splitlines():
            if not line.startswith("      "):
                break
            lines.append(line[6:])
        choices = _plain_items(lines, mapping=True) or _yaml("\n".join(lines)) or {}
    else:
        content = _yaml(hydra_yaml) or {}
        choices = content.get("hydra", {}).get("runtime", {}).get("choices", {})
    return {k: v for k, v in choices.items() if "/" not in k and not k.startswith("hydra")}


def _plain_items(lines: list[str], mapping: bool = False) -> Any:
    """The items of a YAML list (``- item``) or flat mapping (``key: value``) of one-line plain
    strings, as Hydra writes overrides.yaml and the choices; None when any item is quoted, empty
    or not plain, and YAML must parse it. (Plain scalars are literal text: this reads them as YAML
    does, 20x faster than YAML's constructor, which is most of the collector's time per group.)"""
    items = {} if mapping else []
    for line in lines:
        if mapping:
            key, sep, value = line.partition(": ")
            if not sep or not key or key[0] in "'\"" or not value or value[0] in "'\"[{&*!|>%@`#":
                return None
            items[key] = None if value in ("null", "~") else value
        else:
            if not line.startswith("- ") or not line[2:] or line[2] in "'\"[{&*!|>%@`#":
                return None
            items.append(line[2:])
    return items or None


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SAFE_LOADER)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Hydra override strings as {key: value text}, without the seed and hydra.* keys;
    ``+key=v`` and ``++key=v`` count as ``key``, a deletion ``~key`` as ``{"~key": None}``."""
    parsed: dict[str, Any] = {}
    for override in overrides:
        key, sep, value = str(override).partition("=")
        key = key.lstrip("+")
        if key == "seed" or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        parsed[key] = value if sep else None
    return parsed


def _text_if_exists(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _subdirectories(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _seed(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _ordered_union(key_lists: Iterable[Iterable[str]]) -> list[str]:
    return list(dict.fromkeys(k for keys in key_lists for k in keys))
