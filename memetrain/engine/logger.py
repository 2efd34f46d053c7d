"""What a run reports: TensorBoard events, ``metrics.jsonl`` and the console, from rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Scalars go to TensorBoard (``<run>/tb``) and to ``<run>/metrics.jsonl`` (one row per call).

    On resume from step ``start_step`` rows logged after it by the killed run are dropped from
    ``metrics.jsonl`` and TensorBoard purges its events after that step, so curves never double.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            _truncate_after(self.path, start_step)
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")

    def image_grid(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        """A grid of uint8 images ``[N, 3, H, W]``."""
        if self.enabled:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images, nrow=8), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.enabled:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            self.writer.add_hparams(flat, metrics, run_name="hparams")

    def history(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(row + "\n" for row in rows))
