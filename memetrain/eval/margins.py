"""Attribute-probe margins: how much a pretraining put into its features, over the same backbone at
random initialisation.

A run and its baseline are the same command, the baseline with ``trainer.max_steps=0`` (nothing
trained: the weights the run started from, by the same seed). Probing both for the attribute
columns (``eval.targets``) and subtracting says what the pretraining learned of each factor,
beyond what a random network's features already separate. ``configs/sweep/synth_attributes.yaml``
runs each method and its ``<row>-random_init`` twin at every seed; then::

    python -m memetrain.eval.margins runs/sweeps/synth_attributes

prints, per method, protocol and attribute, the trained score, the random-init score and their
difference, mean +- std over the seeds (each seed's margin against the same seed's baseline), and
writes them to ``attribute_margins.md`` and ``.csv`` in that directory. The score is accuracy for
a class-id attribute and AUROC for a 0/1 one, on ``--split`` (default test). Any directory of run
directories works: a run named ``X-random_init-seedN`` is the baseline of ``X-seedN``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "-random_init"
_SEED = re.compile(r"^(?P<row>.+)-seed(?P<seed>\d+)$")


def attribute_scores(results: dict[str, Any], split: str) -> dict[tuple[str, str], float]:
    """(protocol, attribute) -> score on ``split``: accuracy (class ids) or AUROC (0/1)."""
    scores = {}
    for protocol, result in results.get("protocols", {}).items():
        for name, attribute in result.get("attributes", {}).items():
            metrics = attribute.get("splits", {}).get(split, {})
            value = metrics.get("accuracy" if attribute.get("kind") == "classes" else "auroc")
            if value is not None:
                scores[(protocol, name)] = float(value)
    return scores


def collect_margins(root: Path, split: str) -> list[dict[str, Any]]:
    """One row per (method row, protocol, attribute) that has trained and baseline runs of the same
    seeds under ``root``."""
    runs: dict[tuple[str, int], dict[tuple[str, str], float]] = {}
    for path in sorted(root.glob("*/results.json")):
        match = _SEED.match(path.parent.name)
        if match is None:
            continue
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"skipped {path}: not readable JSON", file=sys.stderr)
            continue
        runs[(match["row"], int(match["seed"]))] = attribute_scores(results, split)
    table: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for (row, seed), scores in runs.items():
        if row.endswith(BASELINE) or (row + BASELINE, seed) not in runs:
            continue
        baseline = runs[(row + BASELINE, seed)]
        for key, value in scores.items():
            if key in baseline:
                table[(row, *key)].append((value, baseline[key]))
    rows = []
    for (row, protocol, name), pairs in sorted(table.items()):
        trained, init = np.array(pairs).T
        margin = trained - init
        rows.append(
            {
                "method": row,
                "protocol": protocol,
                "attribute": name,
                "seeds": len(pairs),
                "trained": float(trained.mean()),
                "trained_std": float(trained.std(ddof=1)) if len(pairs) > 1 else 0.0,
                "random_init": float(init.mean()),
                "random_init_std": float(init.std(ddof=1)) if len(pairs) > 1 else 0.0,
                "margin": float(margin.mean()),
                "margin_std": float(margin.std(ddof=1)) if len(pairs) > 1 else 0.0,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], split: str) -> str:
    lines = [
        f"| method | protocol | attribute ({split}) | trained | random init | margin | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['protocol']} | {r['attribute']} | {r['trained']:.3f} ± {r['trained_std']:.3f} | "
            f"{r['random_init']:.3f} ± {r['random_init_std']:.3f} | {r['margin']:+.3f} ± {r['margin_std']:.3f} | "
            f"{r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memetrain.eval.margins",
        description="Attribute-probe margins: trained minus random-init scores of each method's runs.",
    )
    parser.add_argument("root", type=Path, help="a sweep directory (or any directory of run directories)")
    parser.add_argument("--split", default="test", help="the eval split scored (default: test)")
    args = parser.parse_args(argv)
    rows = collect_margins(args.root, args.split)
    if not rows:
        print(
            f"no pair of runs X-seedN and X{BASELINE}-seedN with attribute scores on {args.split} under {args.root} "
            "(run configs/sweep/synth_attributes.yaml, or name the baseline runs so)",
            file=sys.stderr,
        )
        return 1
    text = markdown(rows, args.split)
    print(text, end="")
    (args.root / "attribute_margins.md").write_text(text, encoding="utf-8")
    with open(args.root / "attribute_margins.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
