"""A collected table as Markdown (with the notes under it), CSV (full precision) and LaTeX (booktabs)."""

from __future__ import annotations

import csv
import io
import re

from memetrain.sweep.collect import Cell, Row, Table, metric_name
from memetrain.sweep.runs import label

STD = "sample standard deviation (ddof=1)"


def to_markdown(table: Table) -> str:
    header = ["Model", "n", *_headers(table)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = [row.label, _n(row), *_cells(table, row, tex=False)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(_notes(table, markdown=True)) + "\n"


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` to ``\\input`` (needs ``\\usepackage{booktabs}``); the notes as comments."""
    header = ["Model", "$n$", *map(_tex, _headers(table))]
    lines = [f"% {note}" if note else "%" for note in _notes(table, markdown=False)]
    lines += [
        r"\begin{tabular}{lr" + "l" * (len(header) - 2) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = [_tex(row.label), _tex(_n(row)), *_cells(table, row, tex=True)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    published = _published_metrics(table)
    header = ["row", *table.columns, "n", "jobs", "seeds", "protocol", "split"]
    for metric in table.metrics:
        header += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    if table.reference:
        header.append("published")
        for metric in published:
            header += [f"published_{metric}_mean", f"published_{metric}_std", f"delta_{metric}"]
    writer.writerow(header)
    for row in table.rows:
        values = [row.label, *(label({k: row.items[k]}).partition("=")[2] for k in table.columns)]
        values += [len(row.seeds), row.jobs, " ".join(map(str, row.seeds)), row.protocol, row.split]
        for metric in table.metrics:
            cell = row.cells[metric]
            values += [_full(cell.mean), _full(cell.std), cell.n]
        if table.reference:
            values.append(row.published.label if row.published else "")
            for metric in published:
                mean, std = _published_value(row, metric) or (None, None)
                ours = row.cells[metric].mean
                values += [
                    _full(mean),
                    _full(std),
                    _full(None if ours is None or mean is None else ours - mean),
                ]
        writer.writerow(values)
    return out.getvalue()


def mean_std_text(mean: float | None, std: float | None, tex: bool = False) -> str:
    """``0.5398 ± 0.0910``, ``0.5398`` without a std, ``–`` without a value (LaTeX: in math mode)."""
    if mean is None:
        return "--" if tex else "–"
    plus_minus = r"\pm" if tex else "±"
    text = f"{mean:.4f}" if std is None else f"{mean:.4f} {plus_minus} {std:.4f}"
    return f"${text}$" if tex else text


def _headers(table: Table) -> list[str]:
    headers = [] if table.protocol else ["Protocol"]
    headers += [] if table.split else ["Split"]
    headers += [f"{metric_name(m)} ({table.split})" if table.split else metric_name(m) for m in table.metrics]
    if table.reference:
        metrics = _published_metrics(table)
        headers += ["Published", *(f"{metric_name(m)} (published)" for m in metrics)]
        headers += [f"Δ {metric_name(m)}" for m in metrics]
    return headers


def _cells(table: Table, row: Row, tex: bool) -> list[str]:
    """The row's cells after Model and n: protocol and split (where rows differ), ours, published, deltas."""
    text = _tex if tex else str
    cells = [] if table.protocol else [text(row.protocol or "–")]
    cells += [] if table.split else [text(row.split or "–")]
    cells += [_cell(row.cells[m], len(row.seeds), tex) for m in table.metrics]
    if table.reference:
        metrics = _published_metrics(table)
        cells.append(text(row.published.label if row.published else "–"))
        cells += [mean_std_text(*(_published_value(row, m) or (None, None)), tex) for m in metrics]
        cells += [_delta(row.cells[m].mean, _published_value(row, m), tex) for m in metrics]
    return cells


def _cell(cell: Cell, counted: int, tex: bool) -> str:
    """Mean ± std; ``(n=k)`` after it when fewer of the row's runs had this metric."""
    text = mean_std_text(cell.mean, cell.std, tex)
    if cell.n in (0, counted):
        return text
    return f"{text} ($n={cell.n}$)" if tex else f"{text} (n={cell.n})"


def _published_metrics(table: Table) -> list[str]:
    rows = table.reference.rows if table.reference else []
    return [m for m in table.metrics if any(m in published.values for published in rows)]


def _published_value(row: Row, metric: str) -> tuple[float, float | None] | None:
    return row.published.values.get(metric) if row.published else None


def _delta(ours: float | None, published: tuple[float, float | None] | None, tex: bool) -> str:
    if ours is None or published is None:
        return "--" if tex else "–"
    return f"${ours - published[0]:+.4f}$" if tex else f"{ours - published[0]:+.4f}"


def _n(row: Row) -> str:
    return str(len(row.seeds)) if len(row.seeds) == row.jobs else f"{len(row.seeds)} of {row.jobs}"


def _full(value: float | None) -> str:
    return "" if value is None else repr(value)


def _notes(table: Table, markdown: bool) -> list[str]:
    protocol = f"{table.protocol} protocol" if table.protocol else "the protocol in the Protocol column"
    split = f"the {table.split} split" if table.split else "the split in the Split column"
    where = f"{protocol} on {split}"
    notes = [
        f"Cells: {where}; mean ± {STD} over the n seeds of each row "
        "(n: runs counted, 'k of m' when some of the row's jobs are not); a row of one run shows its value alone."
    ]
    if any("=–" in row.label for row in table.rows):
        notes.append(
            "key=– in a row's name: that row's runs do not set the key (they use the config's default)."
        )
    quote = (lambda text: f"`{text}`") if markdown else str
    if table.common:
        notes.append(
            "Common to every row: " + " ".join(quote(label({k: v})) for k, v in table.common.items())
        )
    if table.reference:
        notes.append(
            f"Published: {table.reference.title} ({table.reference.path.name}); Δ = ours − published."
        )
        if table.unmatched:
            notes.append("Published rows without a row here: " + "; ".join(table.unmatched) + ".")
    if table.not_counted:
        notes += ["", f"Not counted ({len(table.not_counted)}; listed, never averaged):"]
        notes += [f"- {note}" if markdown else f"- {note.replace('`', '')}" for note in table.not_counted]
    else:
        notes.append(f"Every job counted ({sum(row.jobs for row in table.rows)}).")
    return notes


_TEX = {
    **{c: "\\" + c for c in "&%$#_{}"},
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "–": "--",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
}
_TEX_PATTERN = re.compile("|".join(map(re.escape, _TEX)))


def _tex(text: str) -> str:
    return _TEX_PATTERN.sub(lambda match: _TEX[match.group()], text)
