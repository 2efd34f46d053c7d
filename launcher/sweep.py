"""Run a sweep: a grid of runs (configs/sweep/<name>.yaml) on Slurm or on this machine, then collect it.

    python launcher/sweep.py +sweep=table2 launcher.gpus_per_node=1     # Slurm: one submitit job array
    python launcher/sweep.py +sweep=demo launcher=local                  # here, one training at a time
    python launcher/sweep.py +sweep=table1 dry_run=true                  # print the jobs, run nothing
    python launcher/sweep.py +sweep=table2 launcher.partition=gpu launcher.gpus_per_node=8 \\
        launcher.tasks_per_node=8 launcher.time_minutes=720 "overrides=['trainer.precision=bf16']"
    python launcher/sweep.py +sweep=semimemes_mami launcher.gpus_per_node=1   # MAMI task B

Results land in runs/sweeps/<name>/<job>/ (one run directory per job) with sweep.json listing the
jobs; re-running the same command skips jobs that have results.json. `--cfg job` prints the config.
"""

from memetrain.cli import sweep

if __name__ == "__main__":
    sweep()
