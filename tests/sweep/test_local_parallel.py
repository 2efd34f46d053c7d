"""launcher=local max_parallel=N: N jobs at once, each on its own GPU or its share of the cores."""

from __future__ import annotations

import datetime
import json
import os

import pytest

from memetrain.errors import ConfigError
from memetrain.sweep.launchers import local_slots
from tests.helpers import run_launcher
from tests.sweep.sweeps import tiny_sweep


def test_each_job_gets_its_own_gpu_or_share_of_the_cores(monkeypatch):
    assert local_slots(1, []) == [{}], "one job at a time changes nothing"
    assert local_slots(2, [0, 1, 3]) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    threads = str(max(1, os.cpu_count() // 2))
    assert local_slots(2, []) == [{"OMP_NUM_THREADS": threads}] * 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert local_slots(2, "auto") == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "6"}]
    with pytest.raises(ConfigError, match="launcher.max_parallel=3 but this machine has 2 GPU"):
        local_slots(3, "auto")
    with pytest.raises(ConfigError, match="launcher.max_parallel=0"):
        local_slots(0, [])


@pytest.mark.slow
def test_two_jobs_run_at_once_each_with_half_the_cores(synth_shards, tmp_path):
    methods = {"text": {"train": ["model=lstm"]}, "image": {"train": ["model=resnet18"]}}
    args = tiny_sweep(tmp_path, synth_shards, methods)
    result = run_launcher("sweep.py", *args, "launcher=local", "launcher.max_parallel=2", "launcher.gpus=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "tiny"
    spans = []
    for job in ("text-seed0", "image-seed0"):
        provenance = json.loads((sweep_dir / job / "provenance.json").read_text())
        assert provenance["torch_threads"] == max(1, os.cpu_count() // 2)
        started = datetime.datetime.fromisoformat(provenance["started"]).timestamp()
        spans.append((started, (sweep_dir / job / "results.json").stat().st_mtime))
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end, f"the jobs ran one after the other: {spans}"
