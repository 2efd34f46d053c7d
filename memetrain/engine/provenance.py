"""``provenance.json``: what it takes to reproduce a run from its directory alone."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "memetrain",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "accelerate",
    "deepspeed",
    "open_clip_torch",
    "huggingface_hub",
    "safetensors",
    "webdataset",
    "hydra-core",
    "scikit-learn",
    "numpy",
    "pillow",
)


def provenance(world_size: int, seed: int) -> dict[str, Any]:
    return {
        "git": _git(),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "world_size": world_size,
        "seed": seed,
        "torch_threads": _torch_threads(),  # OMP_NUM_THREADS and friends: a shared machine's share of it
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "command": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _git() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    return {
        "revision": revision,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if revision else None,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
