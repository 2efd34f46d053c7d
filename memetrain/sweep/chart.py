"""The collected table as a bar chart: one bar per metric and row, the std over seeds as error bars,
the published means (when a reference is given) as black ticks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from memetrain.fileio import atomic_writer
from memetrain.sweep.collect import Table, metric_name

MAX_ROWS = 40  # more rows than this are unreadable as bars; the chart says so and table.md has them all


def plot_table(table: Table, path: Path) -> Path:
    rows = table.rows[:MAX_ROWS]
    metrics = table.metrics
    width = 0.8 / len(metrics)
    fig = Figure(figsize=(9, 1.6 + 0.22 * len(rows) * len(metrics)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    published_drawn = False
    for index, metric in enumerate(metrics):
        cells = [row.cells[metric] for row in rows]
        means = np.array([np.nan if c.mean is None else c.mean for c in cells])
        stds = np.array([0.0 if c.std is None else c.std for c in cells])
        positions = y - 0.4 + width * (index + 0.5)
        ax.barh(positions, means, height=width, xerr=stds, capsize=2, label=metric_name(metric))
        published = [row.published.values.get(metric) if row.published else None for row in rows]
        if any(published):
            ax.plot(
                [np.nan if p is None else p[0] for p in published],
                positions,
                "k|",
                markersize=10,
                markeredgewidth=2,
                label=None if published_drawn else "published",
            )
            published_drawn = True
    ax.axvline(0.5, linestyle=":", color="0.6")
    ax.set_yticks(y, [row.label for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    where = f"{table.protocol or 'protocol per row'} on {table.split or 'split per row'}"
    title = f"{where}: mean ± sample std (ddof=1) over seeds"
    if len(table.rows) > MAX_ROWS:
        title += f"\nfirst {MAX_ROWS} of {len(table.rows)} rows (all in table.md)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path
