"""Published numbers to print beside ours (``reference=<name>``): the tables in ``configs/published/``.

(The folder is not called ``reference/``: Hydra would take a config folder of that name for a
config group and refuse ``reference=<name>`` as an override of it.)

A reference table is a list of rows, each with the published label, a ``match`` of settings that
picks our group (every key must equal the group's value, looked up in this order: the sweep's group
values, where ``method`` is the method's label in the sweep config; the job's Hydra overrides; the
method its results.json names; the run's resolved config keys such as ``data.image_size``), an
optional split, and the published metrics as ``[mean, std]`` or a bare mean.

Every table names its metrics (``metrics``: each metric key it uses, with how the source computes
it), and a metric key is the name of our table's column it is set beside: a published value is
only ever shown next to the same metric of ours (:func:`memetrain.sweep.collect.build_table`
refuses a matched row whose metric our runs do not report). The SemiMemes MAMI figures, for
example, are ``task_b_f1_weighted_macro``: each task-B label's macro F1 weighted by its positive
count, as its ``weighted_f1_multilabel`` computes it, not the main label's weighted F1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from memetrain.errors import ConfigError

REFERENCE_DIR = Path(__file__).parents[1] / "configs" / "published"
METRICS = (
    "auroc",
    "accuracy",
    "f1_weighted",
    "f1_macro",
    "task_b_f1_weighted_macro",
    "task_b_f1_weighted",
    "task_b_f1_macro",
    "task_b_auroc",
)  # our table's column keys (memetrain/sweep/collect.py)
ROW_KEYS = {"label", "match", "split", *METRICS}


@dataclass(frozen=True)
class Published:
    """One published row: its label, which of our groups it is, and its (mean, std) per metric."""

    label: str
    match: dict[str, Any]
    split: str | None  # None: the source does not say; compared with whichever split our table shows
    values: dict[str, tuple[float, float | None]]


@dataclass(frozen=True)
class ReferenceTable:
    path: Path
    title: str
    rows: list[Published]
    metrics: dict[str, str]  # each metric the table publishes, with how its source computes it

    def row_for(self, lookup: Callable[[str], Any], split: str | None, group: str) -> Published | None:
        """The row whose ``match`` the group satisfies (``lookup(key)`` gives its value or raises
        KeyError), among the rows for ``split``; two matching rows are an error in the file."""
        found = [
            row
            for row in self.rows
            if row.split in (None, split) and all(_matches(lookup, k, v) for k, v in row.match.items())
        ]
        if len(found) > 1:
            raise ConfigError(
                f"{self.path}: rows {found[0].label!r} and {found[1].label!r} both match {group}; "
                "add a match key that tells them apart"
            )
        return found[0] if found else None


def load_reference(name: str) -> ReferenceTable:
    """``name`` is a file in configs/published/ (without .yaml) or a path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) or "/" in name else REFERENCE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(
            f"reference={name}: no file {path}; choose one of {known} (configs/published/) or give a YAML path"
        )
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(content, dict) or not isinstance(content.get("rows"), list) or not content["rows"]:
        raise ConfigError(f"{path}: expected a mapping with title, split and a non-empty list of rows")
    default_split = content.get("split")
    metrics = _declared_metrics(path, content.get("metrics"))
    rows = [_row(path, index, row, default_split) for index, row in enumerate(content["rows"])]
    for row in rows:
        undeclared = sorted(set(row.values) - set(metrics))
        if undeclared:
            raise ConfigError(
                f"{path}: row {row.label!r} publishes {undeclared}, which the table's metrics do not name; "
                "add each to metrics with how the source computes it"
            )
    return ReferenceTable(path=path, title=str(content.get("title") or path.stem), rows=rows, metrics=metrics)


def _declared_metrics(path: Path, metrics: Any) -> dict[str, str]:
    """The table's ``metrics``: our metric key -> how the source computes it."""
    if not isinstance(metrics, dict) or not metrics:
        raise ConfigError(
            f"{path}: name the published metrics: metrics: {{<one of {', '.join(METRICS)}>: <how the source "
            "computes it>}}, so that a published value is set beside the same metric of ours"
        )
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(
            f"{path}: metrics {unknown} are not columns of our tables; use {', '.join(METRICS)}"
        )
    return {str(k): str(v) for k, v in metrics.items()}


def _row(path: Path, index: int, row: Any, default_split: str | None) -> Published:
    where = f"{path}, row {index}"
    if not isinstance(row, dict) or not isinstance(row.get("label"), str):
        raise ConfigError(f"{where}: a row needs a label, a match and at least one of {', '.join(METRICS)}")
    where = f"{where} ({row['label']})"
    unknown = set(row) - ROW_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; metrics are {', '.join(METRICS)}")
    if not isinstance(row.get("match"), dict) or not row["match"]:
        raise ConfigError(f"{where}: match must map setting keys (method, data.image_size, ...) to values")
    values = {}
    for metric in METRICS:
        if metric in row:
            values[metric] = _value(where, metric, row[metric])
    if not values:
        raise ConfigError(f"{where}: no published metric; give one of {', '.join(METRICS)}")
    return Published(row["label"], dict(row["match"]), row.get("split", default_split), values)


def _value(where: str, metric: str, value: Any) -> tuple[float, float | None]:
    numbers = value if isinstance(value, list) else [value]
    mean, std = [*numbers, None][:2] if len(numbers) in (1, 2) else (None, None)
    if not _is_number(mean) or not (std is None or _is_number(std)):
        raise ConfigError(f"{where}: {metric} must be a number or [mean, std]; got {value!r}")
    return float(mean), None if std is None else float(std)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(lookup: Callable[[str], Any], key: str, wanted: Any) -> bool:
    try:
        value = lookup(key)
    except KeyError:
        return False
    options = wanted if isinstance(wanted, list) else [wanted]  # a list: any of these values
    return any(same_value(value, option) for option in options)


def same_value(ours: Any, theirs: Any) -> bool:
    """Equal as numbers when both read as numbers ("224" and 224, 0.05 and "0.05"), else as text
    (case-insensitive; None and "null" are the same)."""
    a, b = ("null" if v is None else v for v in (ours, theirs))
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()
