"""Checkpoints: Accelerate's state (model, optimizer, scaler, every RNG) plus our JSON trainer state.

A checkpoint is a directory ``checkpoints/step_NNNNNNN``. It is written as ``.step_NNNNNNN.tmp``
and renamed only when every rank has finished writing, so a run killed mid-write leaves the
previous checkpoint as the newest complete one, and one that cannot be written (a full disk) is
removed and reported. Nothing here is unpickled on load: tensors come from safetensors or
``torch.load(weights_only=True)`` (Accelerate's loader), our state from JSON.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME
from accelerate.utils import load as weights_only_load
from safetensors import SafetensorError

from memetrain.errors import MemetrainError
from memetrain.fileio import atomic_write_json, atomic_write_text

_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(MemetrainError):
    pass


class Checkpointer:
    """Saves and finds checkpoints under ``directory``, keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int, accelerator: Accelerator):
        if keep < 1:
            raise CheckpointError(f"trainer.keep_checkpoints={keep}: keep at least 1")
        self.directory, self.keep, self.accelerator = Path(directory), keep, accelerator

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any], config_yaml: str) -> Path:
        """Write a checkpoint for ``step`` from every rank; returns its final path."""
        acc = self.accelerator
        final = self.directory / f"step_{step:07d}"
        tmp = self.directory / f".step_{step:07d}.tmp"
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            atomic_write_json(tmp / f"trainer_state_{acc.process_index}.json", state)
            if acc.is_main_process:
                atomic_write_text(tmp / "config.yaml", config_yaml)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)  # the space back; the previous checkpoint stays the newest
            free = shutil.disk_usage(self.directory).free / 2**20
            previous = self.latest()
            raise CheckpointError(
                f"writing checkpoint {final} failed ({_reason(err)}); {free:.0f} MiB are free there. Free "
                "space (or lower trainer.keep_checkpoints) and re-run the same command: it resumes from "
                f"{previous.name if previous else 'the start'}"
            ) from None
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(
                final, ignore_errors=True
            )  # a checkpoint of this step from a run that died after it
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore Accelerate's state from ``path`` and return this rank's trainer state."""
        path = Path(path)
        state_file = path / f"trainer_state_{self.accelerator.process_index}.json"
        if not state_file.is_file():
            raise CheckpointError(
                f"{path} has no {state_file.name}: it is not a memetrain checkpoint, or it was written by "
                "fewer ranks than this run has; resume with the same number of processes"
            )
        try:
            # Accelerate skips RNG states it cannot read with an info line, and the resume would
            # silently differ from an uninterrupted run: read them once here to fail instead.
            weights_only_load(path / f"{RNG_STATE_NAME}_{self.accelerator.process_index}.pkl")
            self.accelerator.load_state(str(path))
            return json.loads(state_file.read_text())
        except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded ({_reason(err)}): it is damaged, comes from another "
                "model or config, or holds pickled code (never run: only tensors are read). Move it out "
                f"of {self.directory} to resume from the one before it, or start over in another hydra.run.dir"
            ) from None


def _reason(err: BaseException) -> str:
    """The exception's type and the first line of its message (torch's run to many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
