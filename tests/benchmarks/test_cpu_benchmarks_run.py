"""Every script of ``make bench`` still runs against the library as it is (``--quick``: tiny, not
recorded): a benchmark that no longer runs measures nothing, and only running it tells."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

SCRIPTS = {
    "data_pipeline.py": (
        [],
        "| baseline C: WebDataset with MemeStream's decode (decode_rgb + Resize, uint8), 2 workers |",
    ),
    "train_step.py": (
        ["--cases", "clip_small"],
        "| CLIP, ResNet-18 + 2-layer transformer, 64 px, batch 32 |",
    ),
    "memory.py": ([], "| peak training memory, ViT-B/16, batch 4, 224 px"),  # --quick: batch 4
    "collector.py": ([], "| collect_sweep, sweep.json layout,"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_quick_run_prints_its_table_and_records_nothing(script):
    arguments, row = SCRIPTS[script]
    record = (REPO / "BENCHMARKS.md").read_bytes()
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert row in result.stdout, result.stdout[-3000:]
    assert (REPO / "BENCHMARKS.md").read_bytes() == record  # --quick is not recorded
