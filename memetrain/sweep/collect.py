"""Collect a sweep into mean ± std tables: ``table.md``, ``table.csv``, ``table.tex``, ``table.png``.

    python launcher/collect.py runs/sweeps/table1 reference=cass_table1
    python launcher/collect.py runs/synth protocol=linear_probe split=dev

Runs are grouped by everything but the seed (see ``memetrain/sweep/runs.py``). A cell is the mean
± the sample standard deviation (ddof=1) of a metric over a group's seeds, with n beside it; a group
of one run shows its value alone. The metrics are one protocol's on one evaluation split: AUROC and
accuracy, and weighted F1 where a group ran on MAMI (the score the SemiMemes paper reports there);
where runs also predicted other labels (MAMI task B: shaming, stereotype, objectification,
violence), their MAMI score (the official task B F1: each label's macro F1 weighted by its positive
count), scikit-learn's weighted and macro positive-class F1, mean AUROC and each label's F1.
Jobs without results (failed, pending, running, or done without a results.json), results.json
files it cannot read (empty, cut off, not JSON, keys missing or of the wrong kind: each with why)
and runs without the tabled metrics are listed under the table, never averaged away and never
fatal. run.py writes results.json whole (:mod:`memetrain.fileio`: a temporary file, fsynced, then
renamed), so a run killed or out of disk space while writing it leaves none; one that cannot be
read was damaged afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from memetrain.errors import ConfigError
from memetrain.fileio import atomic_write_text
from memetrain.sweep.reference import Published, ReferenceTable, load_reference
from memetrain.sweep.runs import Job, describe, find_jobs, flat_config, label

PROTOCOLS = ("auto", "classifier", "linear_probe", "knn")
METRICS = ("auroc", "accuracy")
MAMI_METRIC = "f1_weighted"  # added to the table when a group ran on MAMI
TASK_B = (
    "task_b_f1_weighted_macro",
    "task_b_f1_weighted",
    "task_b_f1_macro",
    "task_b_auroc",
)  # then "f1:<label>" per label
TASK_B_KEYS = ("f1_weighted_macro", "f1_weighted", "f1_macro", "auroc")  # read from a task-B score
NAMES = {
    "auroc": "AUROC",
    "accuracy": "Accuracy",
    "f1_weighted": "F1 (weighted)",
    "f1_macro": "F1 (macro)",
    "task_b_f1_weighted_macro": "Task B F1 (MAMI score)",
    "task_b_f1_weighted": "Task B F1 (weighted)",
    "task_b_f1_macro": "Task B F1 (macro)",
    "task_b_auroc": "Task B AUROC",
}
OUTPUTS = ("table.md", "table.csv", "table.tex", "table.png")


def metric_name(metric: str) -> str:
    """A metric's column title: ``f1:shaming`` is ``F1 shaming``."""
    return NAMES.get(metric) or f"F1 {metric.removeprefix('f1:')}"


@dataclass
class Cell:
    """One metric of one group: the values of its runs (a run without the metric adds none)."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @cached_property  # read once the group is complete; every format and the chart reuse it
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @cached_property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for fewer than two runs."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None


@dataclass
class Row:
    label: str
    items: dict[str, Any]  # the settings that name the row
    jobs: int  # jobs in the group
    seeds: list[int | None]  # seeds of the runs counted
    cells: dict[str, Cell]
    protocol: str  # whose metrics its runs counted ("" when none; "a, b" when they differ)
    split: str  # on which evaluation split (the same)
    method: str | None  # the method its results.json names (None when its runs disagree or none counted)
    mami: bool  # some run of the group ran on MAMI
    first_counted: Job | None  # whose settings and config speak for the group when matching published rows
    published: Published | None = None


@dataclass
class Table:
    rows: list[Row]
    metrics: list[str]
    columns: list[str]  # the setting keys that name the rows, in order
    common: dict[str, Any]  # settings every row shares
    protocol: str | None  # of every row; None when rows differ (a Protocol column says)
    split: str | None  # of every row; None when rows differ (a Split column says)
    reference: ReferenceTable | None
    not_counted: list[str]  # jobs and runs left out of the cells, with why
    unmatched: list[str]  # published rows without a group here


def collect_sweep(
    sweep_dir: Path, reference: str | None = None, protocol: str = "auto", split: str = "auto"
) -> str:
    """Write ``table.md``, ``table.csv``, ``table.tex`` and ``table.png`` into ``sweep_dir``;
    return the Markdown (the table and the lists under it).

    ``protocol``: classifier, linear_probe or knn; auto takes classifier where a run has it, else
    linear_probe. ``split``: an evaluation split name; auto takes the first labeled split whose name
    starts with ``test`` (test, test_seen), else the last labeled one. ``reference``: a name in
    ``configs/published/`` or a YAML path, printed beside ours with deltas.
    """
    from memetrain.sweep.chart import plot_table
    from memetrain.sweep.render import to_csv, to_latex, to_markdown

    sweep_dir = Path(sweep_dir)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol}: choose one of {', '.join(PROTOCOLS)}")
    table = build_table(sweep_dir, load_reference(reference) if reference else None, protocol, split)
    markdown = to_markdown(table)
    atomic_write_text(sweep_dir / "table.md", markdown)
    atomic_write_text(sweep_dir / "table.csv", to_csv(table))
    atomic_write_text(sweep_dir / "table.tex", to_latex(table))
    plot_table(table, sweep_dir / "table.png")
    return markdown


def build_table(sweep_dir: Path, reference: ReferenceTable | None, protocol: str, split: str) -> Table:
    jobs, not_counted = find_jobs(sweep_dir)
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    items, common = describe(groups)
    read = found = 0
    available: set[str] = set()
    task_b: list[str] = []  # the task-B metrics any counted run has, in order
    rows = []
    for key, group_jobs in groups.items():
        cells = {metric: Cell() for metric in (*METRICS, MAMI_METRIC)}
        seeds, protocols, splits, sources, methods, counted = [], set(), set(), set(), set(), []
        for job in group_jobs:
            results = _read_results(job)
            if results is None:
                not_counted.append(_why_no_results(job))
                continue
            if isinstance(results, str):
                not_counted.append(
                    f"`{job.name}` (seed {job.seed}): {job.directory}/results.json {results}; delete it and "
                    "re-run the job"
                )
                continue
            read += 1
            chosen = _choose(results, protocol, split)
            if isinstance(chosen, str):
                not_counted.append(f"`{job.name}` (seed {job.seed}): {chosen}")
                available |= _labeled(results)
                continue
            found += 1
            seed = results.get("seed", job.seed)
            if seed in seeds:
                not_counted.append(f"`{job.name}` (seed {seed}): another run of its row has the same seed")
                continue
            used_protocol, used_split, metrics = chosen
            seeds.append(seed)
            counted.append(job)
            protocols.add(used_protocol)
            splits.add(used_split)
            sources.add(results.get("data", {}).get("source"))
            methods.add(results.get("method"))
            task_b += [m for m in metrics if _is_task_b(m) and m not in task_b]
            for metric in task_b:
                cells.setdefault(metric, Cell())
            for metric, cell in cells.items():
                value = metrics.get(metric)
                if value is not None:
                    cell.values.append(float(value))
                elif metric in METRICS and "accuracy" in metrics:  # a task-B-only run has no main label
                    reason = metrics.get(f"{metric}_reason") or "not in results.json"
                    not_counted.append(
                        f"`{job.name}` (seed {job.seed}): no {metric} on {used_split} ({reason})"
                    )
        row = Row(
            label=label(items[key]) or _headline(common, methods),
            items=items[key],
            jobs=len(group_jobs),
            seeds=seeds,
            cells=cells,
            protocol=", ".join(sorted(protocols)),
            split=", ".join(sorted(splits)),
            method=next(iter(methods)) if len(methods) == 1 else None,
            mami="mami" in sources,
            first_counted=counted[0] if counted else None,
        )
        rows.append(row)
    if read and not found:
        raise ConfigError(
            f"no run in {sweep_dir} has {protocol} metrics"
            + ("" if split == "auto" else f" on split {split}")
            + "; the runs have "
            f"{', '.join(sorted(available)) or 'no labeled split'} (set protocol= and split=)"
        )
    main = any(row.cells["accuracy"].n for row in rows) or not task_b
    metrics = [
        *(METRICS if main else ()),
        *((MAMI_METRIC,) if main and any(row.mami for row in rows) else ()),
    ]
    metrics += task_b
    for row in rows:
        row.cells = {metric: row.cells.get(metric, Cell()) for metric in metrics}
    row_protocols = {row.protocol for row in rows if row.protocol}
    row_splits = {row.split for row in rows if row.split}
    unmatched = _match_reference(reference, rows, metrics) if reference else []
    columns = list(dict.fromkeys(k for row in rows for k in row.items))
    return Table(
        rows=rows,
        metrics=metrics,
        columns=columns,
        common=common,
        protocol=next(iter(row_protocols)) if len(row_protocols) == 1 else None,
        split=next(iter(row_splits)) if len(row_splits) == 1 else None,
        reference=reference,
        not_counted=not_counted,
        unmatched=unmatched,
    )


def _read_results(job: Job) -> dict[str, Any] | str | None:
    """The run's results.json; None where it has none; why, where it has one that cannot be read."""
    path = f"{job.directory}/results.json"  # a str: 10 000 Path joins cost more than the reads
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not content.strip():
        return f"is empty ({len(content)} bytes)"
    try:
        results = json.loads(content)
    except ValueError as err:  # UnicodeDecodeError too
        return f"is not JSON, or is cut off ({err})"
    return _malformed(results) or results


def _malformed(results: Any) -> str | None:
    """What in ``results`` (a parsed results.json) the collector cannot read, or None: the keys it
    reads present and of their kind (run.py's layout, :func:`memetrain.eval.protocols.score_splits`)."""
    if not isinstance(results, dict):
        return f"holds a JSON {type(results).__name__}, not the object of a memetrain run's results"
    if not isinstance(results.get("protocols"), dict):
        return "has no 'protocols' object: it is not a results.json written by memetrain"
    for key, kinds in (("seed", (int, type(None))), ("method", (str, type(None))), ("data", (dict,))):
        if key in results and not _of_kind(results[key], kinds):
            return f"has {key}={_short(results[key])}, not {' or '.join(_kind_names(kinds))}"
    for protocol, result in results["protocols"].items():
        where = f"protocols.{protocol}"
        if not isinstance(result, dict):
            return f"has {where}={_short(result)}, not an object"
        for part in ("splits", "multilabel"):
            if not isinstance(result.get(part, {}), dict):
                return f"has {where}.{part}={_short(result[part])}, not an object"
        for name, metrics in result.get("splits", {}).items():
            if not isinstance(metrics, dict):
                return f"has {where}.splits.{name}={_short(metrics)}, not an object"
            if problem := _not_numbers(metrics, (*METRICS, MAMI_METRIC), f"{where}.splits.{name}", False):
                return problem
        for name, metrics in result.get("multilabel", {}).items():
            here = f"{where}.multilabel.{name}"
            if not isinstance(metrics, dict):
                return f"has {here}={_short(metrics)}, not an object"
            if "per_label" not in metrics:
                continue  # not a task-B score: the collector reads nothing of it
            if problem := _not_numbers(metrics, TASK_B_KEYS, here, True):
                return problem
            if not isinstance(metrics["per_label"], dict):
                return f"has {here}.per_label={_short(metrics['per_label'])}, not an object"
            for label_name, scores in metrics["per_label"].items():
                if not isinstance(scores, dict):
                    return f"has {here}.per_label.{label_name}={_short(scores)}, not an object"
                if problem := _not_numbers(scores, ("f1",), f"{here}.per_label.{label_name}", True):
                    return problem
    return None


def _not_numbers(metrics: dict, keys: tuple[str, ...], where: str, required: bool) -> str | None:
    """Why ``metrics`` cannot give the numbers ``keys`` (a number, or null where it has none)."""
    for key in keys:
        if key not in metrics:
            if required:
                return f"lacks {where}.{key}"
            continue
        value = metrics[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"has {where}.{key}={_short(value)}, not a number"
    return None


def _of_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def _kind_names(kinds: tuple[type, ...]) -> list[str]:
    names = {int: "an integer", str: "a string", dict: "an object", type(None): "null"}
    return [names[kind] for kind in kinds]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _why_no_results(job: Job) -> str:
    where = f"`{job.name}` (seed {job.seed})"
    if job.status is None:
        return (
            f"{where}: no results.json (unfinished or failed; see {job.log or job.directory / 'train.log'})"
        )
    if job.status == "failed":
        return f"{where}: failed{f' ({job.error})' if job.error else ''}; log: {job.log}"
    if job.status == "done":
        return f"{where}: done but {job.directory}/results.json is missing; log: {job.log}"
    return f"{where}: {job.status}"


def _choose(results: dict, protocol: str, split: str) -> tuple[str, str, dict] | str:
    """(protocol, split, metrics) to table for this run, or why it has none."""
    protocols = results["protocols"]
    if protocol == "auto":
        protocol = next((p for p in ("classifier", "linear_probe") if p in protocols), "")
        if not protocol:
            return f"no classifier or linear_probe results (it has {', '.join(protocols) or 'none'})"
    elif protocol not in protocols:
        return f"no {protocol} results (it has {', '.join(protocols) or 'none'})"
    main, task_b = _scored_splits(protocols[protocol])
    splits = list(dict.fromkeys([*main, *task_b]))
    if split == "auto":
        chosen = next((s for s in splits if s.startswith("test")), splits[-1] if splits else None)
        if chosen is None:
            return f"no labeled evaluation split in its {protocol} results"
    elif split not in splits:
        return f"no {protocol} metrics on {split} (labeled splits: {', '.join(splits) or 'none'})"
    else:
        chosen = split
    return protocol, chosen, {**main.get(chosen, {}), **_task_b_metrics(task_b.get(chosen))}


def _scored_splits(result: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """A protocol's labeled splits: the main label's metrics, and the other labels' (task B)."""
    main = {name: m for name, m in result.get("splits", {}).items() if "accuracy" in m}
    task_b = {name: m for name, m in result.get("multilabel", {}).items() if "per_label" in m}
    return main, task_b


def _task_b_metrics(metrics: dict | None) -> dict[str, float | None]:
    if metrics is None:
        return {}
    return {
        "task_b_f1_weighted_macro": metrics["f1_weighted_macro"],
        "task_b_f1_weighted": metrics["f1_weighted"],
        "task_b_f1_macro": metrics["f1_macro"],
        "task_b_auroc": metrics["auroc"],
        **{f"f1:{name}": label["f1"] for name, label in metrics["per_label"].items()},
    }


def _is_task_b(metric: str) -> bool:
    return metric in TASK_B or metric.startswith("f1:")


def _labeled(results: dict) -> set[str]:
    return {
        f"{protocol}/{name}"
        for protocol, result in results["protocols"].items()
        for scored in _scored_splits(result)
        for name in scored
    }


def _headline(common: dict[str, Any], methods: set[str]) -> str:
    """The name of a row when nothing varies between rows: its method and model."""
    items = {k: common[k] for k in ("method", "model") if k in common}
    if "method" not in items and len(methods) == 1:
        items = {"method": next(iter(methods)), **items}
    return label(items) or "all runs"


def _match_reference(reference: ReferenceTable, rows: list[Row], metrics: list[str]) -> list[str]:
    """Attach each row's published row; return the published rows no row matched. A published row
    whose metric our row does not report is refused: it would stand beside a different metric."""
    used = set()
    for row in rows:
        if row.first_counted is None or "," in row.split:
            continue
        row.published = reference.row_for(_lookup(row.first_counted, row), row.split, f"row `{row.label}`")
        if row.published is not None:
            used.add(id(row.published))
            _check_same_metrics(reference, row, metrics)
    splits = {row.split for row in rows}
    return [
        published.label
        for published in reference.rows
        if id(published) not in used and (published.split is None or published.split in splits)
    ]


def _check_same_metrics(reference: ReferenceTable, row: Row, metrics: list[str]) -> None:
    missing = [m for m in row.published.values if m not in metrics]
    if missing:
        described = "; ".join(f"{m}: {reference.metrics[m]}" for m in missing)
        raise ConfigError(
            f"{reference.path.name}: {row.published.label!r} publishes {described}; row `{row.label}` has no "
            f"such metric (the runs report {', '.join(metrics) or 'none'}), and a "
            "published value is only set beside the same metric: run what reports it (MAMI task B: "
            "data=mami_task_b) or choose another reference"
        )


def _lookup(job: Job, row: Row):
    """A group's value of a match key: its settings, its overrides, its method, its resolved config."""
    config: dict[str, Any] = {}

    def lookup(key: str) -> Any:
        for mapping in (job.settings, job.overrides, {"method": row.method}):
            if key in mapping and mapping[key] is not None:
                return mapping[key]
        if not config:
            config.update(flat_config(job.directory))
        return config[key]

    return lookup
