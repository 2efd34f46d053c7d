"""The sbatch script submitit writes for a sweep passes the job's CPUs per task on to srun."""

from __future__ import annotations

import subprocess

from omegaconf import OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

from memetrain.sweep.launchers import PASS_CPUS_PER_TASK, SlurmLauncher
from tests.helpers import REPO


def test_the_job_script_exports_srun_cpus_per_task_before_the_user_setup(tmp_path):
    cfg = OmegaConf.load(REPO / "configs" / "launcher" / "slurm.yaml")
    cfg.setup = ["module load cuda/12.4"]
    parameters = SlurmLauncher(cfg, tmp_path, "demo").parameters()
    assert parameters["setup"] == [PASS_CPUS_PER_TASK, "module load cuda/12.4"]
    script = _make_sbatch_string(command="true", folder=str(tmp_path), **parameters)
    assert script.index(PASS_CPUS_PER_TASK) < script.index("module load cuda/12.4") < script.index("srun")

    for given, exported in (("6", "6"), (None, "")):
        env = {"PATH": "/usr/bin:/bin"} | ({"SLURM_CPUS_PER_TASK": given} if given else {})
        shell = f'set -u; {PASS_CPUS_PER_TASK}; echo "${{SRUN_CPUS_PER_TASK:-}}"'
        out = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == exported
