"""The demo sweep end to end on tiny runs: every job trained and evaluated on this machine, then
collected into the tables."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow


def test_the_demo_sweep_trains_every_row_and_collects_the_table(synth_shards, tmp_path):
    tiny = [o for o in tiny_run_overrides(synth_shards, tmp_path, steps=6) if not o.startswith("hydra.")]
    overrides = ",".join(f"'{o}'" for o in [*tiny, "eval.tsne=false"])
    result = run_launcher(
        "sweep.py", "+sweep=demo", "launcher=local", f"root={tmp_path}", f"overrides=[{overrides}]"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "demo"
    jobs = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 8 and {job["status"] for job in jobs} == {"done"}
    for name in ("table.md", "table.csv", "table.tex"):
        assert (sweep_dir / name).is_file()
    assert any(sweep_dir.glob("*.png")), "the bar chart"
    for method in {job["group"]["method"] for job in jobs}:
        assert method in result.stdout and method in (sweep_dir / "table.md").read_text()
