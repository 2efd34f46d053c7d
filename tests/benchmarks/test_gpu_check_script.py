"""benchmarks/gpu_check.sh and gpu_checks.py where no GPU is: the script parses, names every group
of checks, refuses to measure without a GPU, and its --cpu-smoke run passes every check that can
run on a CPU (the rest SKIP, saying what they need). What they measure on a GPU is not known here."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_checks  # noqa: E402  (a script beside the others, not a package)

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
CUDA_ONLY = {"tf32", "host-syncs", "clip-fp16-deepspeed", "dino-fp16-deepspeed", "sync-batchnorm"}


def test_the_script_parses_and_runs_every_group_of_checks():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    named = set(re.findall(r"([a-z][a-z-]*):\d+", " ".join(re.findall(r"for group in ([^;]*);", text))))
    assert named == {group for group, _ in gpu_checks.CHECKS.values()}


def test_without_a_gpu_it_measures_nothing_and_says_so(capsys):
    assert gpu_checks.main(["all"]) == 1
    assert capsys.readouterr().out.startswith("FAIL setup: no CUDA GPU here")


def test_a_check_on_cpu_passes_or_skips_with_its_reason(capsys):
    assert gpu_checks.main(["--cpu-smoke", "fused-adamw", "tf32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS fused-adamw: max weight difference after 5 steps")
    assert lines[1].startswith("SKIP tf32: TF32 needs CUDA")


@pytest.mark.slow  # every group in its own process: about 4 minutes on 2 shared cores
def test_cpu_smoke_runs_every_check_that_can_run_on_cpu():
    done = subprocess.run(
        [str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, cwd=REPO, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if re.match(r"(PASS|FAIL|SKIP) ", line)]
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in lines}
    expected = {
        name: "SKIP" if name in CUDA_ONLY or name.startswith("compile") else "PASS"
        for name in gpu_checks.CHECKS
    }
    assert {name: status.get(name) for name in expected} == expected, "\n".join(lines)
    assert status["stream-64"] == "PASS" and status["clip-vitb16"] == "SKIP"
