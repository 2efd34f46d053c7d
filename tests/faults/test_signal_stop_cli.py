"""SIGTERM through the command line, as Slurm's preemption or a plain ``kill`` sends it: the run
finishes its step, checkpoints it, exits 75 (EX_TEMPFAIL: re-run to resume) with one line, and the
same command re-run resumes and ends with the weights of a run never stopped. The signal comes from
the run itself as optimizer step 4 begins (``faulty_supervised``'s ``sigterm_steps``), so the test
never races a run that may finish first; SIGUSR2 takes the same path (tests/engine/test_stop_signal.py)."""

from __future__ import annotations

import json

import pytest

from memetrain.errors import STOPPED_EXIT_CODE
from tests.faults.conftest import STEPS, assert_same_weights, fault_run_overrides, run_faulty

pytestmark = pytest.mark.slow


def test_sigterm_checkpoints_the_step_exits_75_and_the_rerun_ends_as_an_unstopped_run(
    synth_shards, reference_run, tmp_path
):
    run_dir = tmp_path / "stopped"
    command = [
        *fault_run_overrides(synth_shards, run_dir), "method.name=faulty_supervised", "+method.sigterm_steps=[4]",
    ]  # fmt: skip
    stopped = run_faulty(*command)
    assert stopped.returncode == STOPPED_EXIT_CODE, stopped.stderr[-3000:]
    last_line = stopped.stderr.strip().splitlines()[-1]
    checkpoint = run_dir / "checkpoints" / "step_0000005"
    assert last_line == f"stopped: stopped by SIGTERM at step 5; checkpoint {checkpoint}; re-run to resume"
    assert "Traceback" not in stopped.stderr
    assert not (run_dir / "results.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1] == "step_0000005"
    trained = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(trained) == 5, "the step under way when the signal came was finished, no further one"

    resumed = run_faulty(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    final = f"checkpoints/step_{STEPS:07d}"
    assert_same_weights(reference_run / final, run_dir / final)
