"""What a run reports: ``metrics.jsonl`` and Accelerate's experiment trackers, from rank 0 only.

``trainer.log_with`` names the trackers (Accelerate's own: ``tensorboard``, the default, into
``<run>/tb``; ``wandb``; ``mlflow``; ``aim``), each configured the way its library reads its
environment (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI`` ...). A tracker's run
id is kept in ``<run>/trackers.json``, so a resumed run continues the same wandb, mlflow or aim run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import AimTracker, GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from memetrain.errors import ConfigError
from memetrain.fileio import atomic_write_json, atomic_write_text

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
TRACKER_IDS = "trackers.json"


class RunLogger:
    """Scalars go to every tracker and to ``<run>/metrics.jsonl`` (one row per call).

    On resume from step ``start_step`` rows logged after it by the killed run are dropped from
    ``metrics.jsonl`` and TensorBoard purges its events after that step, so curves never double.
    Images, texts and hyperparameters go to the trackers that show them.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        start_step: int = 0,
        log_with: list[str] | tuple[str, ...] = ("tensorboard",),
        project: str = "memetrain",
    ):
        unknown = [name for name in log_with if name not in TRACKERS]
        if unknown:
            raise ConfigError(f"trainer.log_with names {unknown}; choose from {', '.join(TRACKERS)}")
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[GeneralTracker] = []
        if enabled:
            _truncate_after(self.path, start_step)
            ids = _tracker_ids(run_dir)
            for name in log_with:
                self.trackers.append(_start(name, run_dir, start_step, project, ids))
            atomic_write_json(run_dir / TRACKER_IDS, ids)

    @property
    def writer(self):
        """TensorBoard's SummaryWriter (images, texts, hparams), when TensorBoard is a tracker."""
        return next((t.writer for t in self.trackers if isinstance(t, TensorBoardTracker)), None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tracker in self.trackers:
            tracker.log(values, step=step)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")

    def image_grid(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        """A grid of uint8 images ``[N, 3, H, W]``."""
        if self.enabled and self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images, nrow=8), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's settings beside its final metrics (TensorBoard's hparams view; the config and
        a last row of metrics for the other trackers)."""
        if not self.enabled:
            return
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        for tracker in self.trackers:
            if isinstance(tracker, TensorBoardTracker):
                tracker.writer.add_hparams(flat, metrics, run_name="hparams")
            else:
                tracker.store_init_configuration(flat)
                tracker.log(metrics)

    def history(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        for tracker in self.trackers:
            if isinstance(tracker, TensorBoardTracker):
                tracker.writer.close()
            else:
                tracker.finish()
        self.trackers = []


def _start(name: str, run_dir: Path, start_step: int, project: str, ids: dict[str, str]) -> GeneralTracker:
    """Accelerate's tracker ``name`` for this run directory, started (resuming its earlier run)."""
    run_name = run_dir.name
    if name == "tensorboard":
        tracker = TensorBoardTracker("tb", run_dir, purge_step=start_step or None)
    elif name == "wandb":
        ids.setdefault("wandb", uuid.uuid4().hex[:16])
        tracker = WandBTracker(project, id=ids["wandb"], resume="allow", name=run_name, dir=str(run_dir))
    elif name == "mlflow":
        tracker = MLflowTracker(experiment_name=project, run_id=ids.get("mlflow"), run_name=run_name)
    else:
        tracker = AimTracker(project, logging_dir=run_dir, run_hash=ids.get("aim"))
    try:
        tracker.start()
    except ImportError as err:
        raise ConfigError(
            f"trainer.log_with has {name}, which is not installed ({err}); pip install {name}"
            + (" (or mlflow-skinny)" if name == "mlflow" else "")
        ) from None
    except Exception as err:  # a tracker's own setup: a URI, a login, a server that is not there
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            f"trainer.log_with: {name} did not start ({type(err).__name__}: {first}); fix its setup "
            "(its environment variables) or leave it out of trainer.log_with"
        ) from None
    if name == "mlflow":
        ids["mlflow"] = tracker.active_run.info.run_id
    elif name == "aim":
        ids["aim"] = tracker.writer.hash
    return tracker


def _tracker_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / TRACKER_IDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(row + "\n" for row in rows))  # a kill here keeps the old file whole
