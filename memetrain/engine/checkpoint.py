"""Checkpoints: Accelerate's state (model, optimizer, scaler, every RNG) plus our JSON trainer state.

A checkpoint is a directory ``checkpoints/step_NNNNNNN``. It is written as ``.step_NNNNNNN.tmp``
and renamed only when every rank has finished writing, so a run killed mid-write leaves the
previous checkpoint as the newest complete one, and one that cannot be written (a full disk) is
removed and reported. Nothing is unpickled on load: tensors come from safetensors or
``torch.load(weights_only=True)``, our state from JSON. Without DeepSpeed that is Accelerate's
loader; under DeepSpeed, Accelerate's state is DeepSpeed's checkpoint (``pytorch_model/``: every
rank's partitions of weights and optimizer), which DeepSpeed's own loader would unpickle
(``weights_only=False``): :func:`memetrain.engine.zero.weights_only_checkpoint_reads` makes it read
each file weights-only, with the few plain classes DeepSpeed stores there allowed
(:func:`memetrain.engine.zero.deepspeed_checkpoint_classes`). A file that names anything else is
refused before it is built, as one :class:`CheckpointError`. Either way ``model.safetensors`` holds
the whole model in fp32 with the method's parameter names and shapes, for fine-tuning and
evaluation (``method.init``, SemiMemes' ``clip.weights``); under ZeRO it is merged from the
partitions by DeepSpeed's ``zero_to_fp32`` on rank 0, inside the temporary directory, from the
files this same save has just written there.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, DistributedType
from accelerate.utils import load as weights_only_load
from safetensors import SafetensorError
from safetensors.torch import save_file

from memetrain.engine.zero import consolidated_weights, weights_only_checkpoint_reads
from memetrain.errors import MemetrainError
from memetrain.fileio import atomic_write_json, atomic_write_text

WEIGHTS = "model.safetensors"
DEEPSPEED_TAG = "pytorch_model"  # the directory Accelerate's save_state gives DeepSpeed's checkpoint

_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(MemetrainError):
    pass


class Checkpointer:
    """Saves and finds checkpoints under ``directory``, keeping the newest ``keep``.

    ``scalar_parameters`` names the parameters that are 0-d in the method but were made
    1-element vectors for DeepSpeed (:func:`memetrain.engine.zero.vectorize_scalar_parameters`).
    """

    def __init__(
        self, directory: str | Path, keep: int, accelerator: Accelerator, scalar_parameters: list[str] = ()
    ):
        if keep < 1:
            raise CheckpointError(f"trainer.keep_checkpoints={keep}: keep at least 1")
        self.directory, self.keep, self.accelerator = Path(directory), keep, accelerator
        self.scalar_parameters = list(scalar_parameters)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.directory)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def step_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or would be)."""
        return self.directory / f"step_{step:07d}"

    def save(self, step: int, state: dict[str, Any], config_yaml: str, keep_also: int | None = None) -> Path:
        """Write a checkpoint for ``step`` from every rank; returns its final path. The newest
        ``keep`` are kept, and the one of step ``keep_also`` (the best on dev) whatever its age."""
        acc = self.accelerator
        final = self.step_path(step)
        tmp = self.directory / f".step_{step:07d}.tmp"
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            atomic_write_json(tmp / f"trainer_state_{acc.process_index}.json", state)
            acc.wait_for_everyone()
            if acc.is_main_process:
                if acc.distributed_type == DistributedType.DEEPSPEED:
                    weights = consolidated_weights(tmp, DEEPSPEED_TAG, self.scalar_parameters)
                    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
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
                if keep_also is None or old != self.step_path(keep_also):
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
            with weights_only_checkpoint_reads(self.accelerator._models):  # DeepSpeed's files too
                self.accelerator.load_state(str(path))
            return json.loads(state_file.read_text())
        except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded ({_reason(err)}): it is damaged, comes from another "
                "model or config, or holds pickled code (never run: only tensors are read). Move it out "
                f"of {self.directory} to resume from the one before it, or start over in another hydra.run.dir"
            ) from None


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory`` (``step_NNNNNNN``; temporary ones excluded), oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _STEP_DIR.match(p.name)), key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was saved at (from its name)."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (checkpoints/step_NNNNNNN)")
    return int(match.group(1))


def _reason(err: BaseException) -> str:
    """The exception's type and the first line of its message (torch's run to many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
