"""Slurm's task variables as torch.distributed's: the one place that maps them.

A task started by ``srun`` (directly, from ``slurm/train.sbatch``, or by submitit, which starts its
tasks with srun) has only Slurm's variables; torch's ``env://`` rendezvous, Accelerate and DeepSpeed
read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Every launcher path calls
:func:`torch_env`: ``memetrain.engine.distributed`` before the Accelerator is built (through
:func:`env_from_slurm`), and ``memetrain.sweep.job`` for each training process of a submitit task.

This module imports neither torch nor the training code (the submitit process stays small). To see
what a task gets::

    srun --ntasks 2 python -m memetrain.slurm_env     # export RANK=0 ... (one block per task)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

from memetrain.errors import ConfigError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000
"""MASTER_PORT derived from the Slurm job id when none is set: the same on every task of a job,
different for jobs that share a node (each array task has its own SLURM_JOB_ID)."""
NO_DEVICES = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU


def torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch's env:// variables for a task started by srun, from Slurm's in ``environ``.

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID,
    LOCAL_WORLD_SIZE = this node's count in SLURM_STEP_TASKS_PER_NODE, NODE_RANK = SLURM_NODEID,
    MASTER_ADDR = the first host of SLURM_STEP_NODELIST (where task 0 runs under Slurm's block and
    cyclic distributions), MASTER_PORT = 20000 + SLURM_JOB_ID mod 20000 unless MASTER_ADDR/PORT
    are set already. LOCAL_RANK is 0 when the task sees one GPU (:func:`single_device_env`).

    Empty when a launcher set RANK (torchrun or ``accelerate launch`` started by srun, one per
    node), or outside an srun step (no SLURM_STEP_NUM_TASKS): a batch script that runs
    ``python launcher/train.py`` itself is one process, whatever it allocated.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    node = int(environ.get("SLURM_NODEID", "0"))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
    mapped = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "NODE_RANK": str(node),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": environ.get("MASTER_PORT")
        or str(SLURM_PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN),
    }
    if "SLURM_STEP_TASKS_PER_NODE" in environ:
        mapped["LOCAL_WORLD_SIZE"] = str(tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])[node])
    mapped.update(single_device_env({**environ, **mapped}))
    return mapped


def env_from_slurm(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set :func:`torch_env`'s variables in ``environ``; returns them."""
    mapped = torch_env(environ)
    environ.update(mapped)
    return mapped


def single_device_env(environ: Mapping[str, str], device_count: int | None = None) -> dict[str, str]:
    """``{"LOCAL_RANK": "0"}`` when this process sees one GPU but LOCAL_RANK names a later one.

    Under ``srun --gpus-per-task 1`` (or a site's GPU binding) every task sees only its own GPU,
    as device 0, while SLURM_LOCALID counts the node's tasks. Accelerate and DeepSpeed take
    LOCAL_RANK as the device index (DeepSpeed calls ``set_device(LOCAL_RANK)``), so it must be 0
    there. One device: CUDA_VISIBLE_DEVICES names one, or ``device_count`` (torch's count, when the
    caller has it) is 1. Empty otherwise.
    """
    if int(environ.get("LOCAL_RANK") or 0) <= 0:
        return {}
    devices = visible_devices(environ)
    if (devices is not None and len(devices) == 1) or device_count == 1:
        return {"LOCAL_RANK": "0"}
    return {}


def visible_devices(environ: Mapping[str, str]) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (``[]``: every GPU hidden), or None where it is unset."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    value = value.strip()
    return [] if value in NO_DEVICES else [entry.strip() for entry in value.split(",") if entry.strip()]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-010,12],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist.strip())
    if match is None:
        raise ConfigError(f"cannot read a host name from the Slurm node list {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts per node: ``4(x2),3`` -> ``[4, 4, 3]``."""
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    return counts


def main() -> None:
    """Print this task's mapping as shell ``export`` lines (nothing outside an srun step)."""
    for name, value in torch_env(os.environ).items():
        print(f"export {name}={value}")


if __name__ == "__main__":
    main()
